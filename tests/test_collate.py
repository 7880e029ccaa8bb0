"""Packing without cross-contamination: packed logits and loss equal per-example ones on the tiny model."""
import pytest
import torch

from culbot.tasks.collate import IGNORE, PackingCollator, PadCollator, pack_rows


def _model(attn):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        rotary_pct=0.5, attn_implementation=attn)
    return GPTNeoXForCausalLM(cfg).eval()


def _examples():
    g = torch.Generator().manual_seed(1)
    out = []
    for n, p in [(12, 4), (7, 0), (20, 5), (5, 2), (9, 9)]:   # (7, 0): trained on inputs; (9, 9): nothing to learn
        ids = torch.randint(3, 100, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * p + ids[p:]})
    return out


def test_pack_rows_first_fit_decreasing():
    assert pack_rows([10, 6, 4, 3], 13) == [[0, 3], [1, 2]]
    assert all(sum([10, 6, 4, 3][i] for i in row) <= 13 for row in pack_rows([10, 6, 4, 3], 13))


@pytest.mark.parametrize("attn,mask_dtype", [("sdpa", torch.bool), ("eager", torch.float32)])
def test_packed_logits_and_loss_equal_per_example(attn, mask_dtype):
    model, ex = _model(attn), _examples()
    batch = PackingCollator(pad_id=0, max_len=32, mask_dtype=mask_dtype)(ex)
    assert batch["input_ids"].shape[0] < len(ex)        # it did pack
    with torch.no_grad():
        packed = model(**batch)
        total, count = 0.0, 0
        for e in ex:
            out = model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]]))
            n = sum(1 for x in e["labels"][1:] if x != IGNORE)
            total += out.loss.item() * n if n else 0.0
            count += n
    assert packed.loss.item() == pytest.approx(total / count, abs=1e-5)
    padded = model(**PadCollator(pad_id=0)(ex))
    assert padded.loss.item() == pytest.approx(total / count, abs=1e-5)


def test_position_ids_only_packing_would_leak_attention():
    """Why PackingCollator builds a mask: transformers' flattening alone lets GPT-NeoX attend across examples."""
    from transformers import DataCollatorWithFlattening

    model, ex = _model("sdpa"), _examples()[:2]
    flat = DataCollatorWithFlattening()(ex)
    with torch.no_grad():
        leaky = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"]).logits[0, len(ex[0]["input_ids"]):]
        alone = model(input_ids=torch.tensor([ex[1]["input_ids"]])).logits[0]
    assert (leaky - alone).abs().max().item() > 1e-3
