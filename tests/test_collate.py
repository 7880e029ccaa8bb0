"""Packing without cross-contamination: packed logits and loss equal per-example ones on the tiny model."""
import random

import datasets
import pytest
import torch

from culbot.tasks.collate import IGNORE, PackedRows, PadCollator, PositionCollator, concat_row, pack_examples


def _model(attn):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        rotary_pct=0.5, attn_implementation=attn, use_cache=False)  # as train_entry runs it
    return GPTNeoXForCausalLM(cfg).eval()


def _examples():
    g = torch.Generator().manual_seed(1)
    out = []
    for n, p in [(12, 4), (7, 0), (20, 5), (5, 2), (9, 9)]:   # (7, 0): trained on inputs; (9, 9): nothing to learn
        ids = torch.randint(3, 100, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * p + ids[p:]})
    return out


def _per_example_mean(model, ex):
    """Token-weighted mean of each example's own loss (what one padded batch also computes)."""
    total, count = 0.0, 0
    for e in ex:
        out = model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]]))
        n = sum(1 for x in e["labels"][1:] if x != IGNORE)
        total += out.loss.item() * n if n else 0.0
        count += n
    return total / count


def test_pack_examples_best_fit_decreasing():
    # 10 opens row 0 (room 3); 6 opens row 1 (room 7); 4 goes to row 1, the only one with room; 3 fills row 0 exactly.
    assert pack_examples([10, 6, 4, 3], 13) == [[0, 3], [1, 2]]
    assert pack_examples([], 8) == []
    with pytest.raises(ValueError, match="example 1 has 9 tokens"):
        pack_examples([3, 9], 8)


def test_pack_examples_fills_rows_on_a_long_tailed_distribution():
    rng = random.Random(0)
    lengths = [min(1024, max(8, int(rng.lognormvariate(5.3, 0.8)))) for _ in range(20_000)]
    rows = pack_examples(lengths, 1024)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))   # each example exactly once
    assert all(sum(lengths[i] for i in row) <= 1024 for row in rows)
    assert sum(lengths) / (len(rows) * 1024) > 0.98


def test_concat_row_restarts_positions_and_masks_each_first_label():
    row = concat_row([[5, 6, 7], [8, 9]], [[IGNORE, 6, 7], [8, 9]])
    assert row == {"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE, 6, 7, IGNORE, 9], "position_ids": [0, 1, 2, 0, 1]}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_and_loss_equal_per_example(attn):
    model, ex = _model(attn), _examples()
    rows = PackedRows(datasets.Dataset.from_list(ex), max_len=32)
    assert len(rows) < len(ex)                                 # it did pack
    assert rows.stats().tokens == sum(len(e["input_ids"]) for e in ex)
    batch = PositionCollator(pad_id=0)([rows[i] for i in range(len(rows))])
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model(**batch)
        expected = _per_example_mean(model, ex)
        assert packed.loss.item() == pytest.approx(expected, abs=1e-5)
        # logits too: the first row's examples, each against running it alone
        start = 0
        for i in rows.rows[0]:
            k = len(ex[i]["input_ids"])
            alone = model(input_ids=torch.tensor([ex[i]["input_ids"]])).logits[0]
            assert (packed.logits[0, start:start + k] - alone).abs().max().item() < 1e-4
            start += k
        assert model(**PadCollator(pad_id=0)(ex)).loss.item() == pytest.approx(expected, abs=1e-5)
        # a fixed width (torch.compile's static shapes) and unpacked rows give the same loss
        static = PositionCollator(pad_id=0, pad_to=40)([rows[i] for i in range(len(rows))])
        assert static["input_ids"].shape[1] == 40
        assert model(**static).loss.item() == pytest.approx(expected, abs=1e-5)
        assert model(**PositionCollator(pad_id=0)(ex)).loss.item() == pytest.approx(expected, abs=1e-5)


def test_packing_needs_the_kv_cache_off():
    """Why train_entry sets use_cache=False: with a cache, transformers ignores position_ids restarts and examples leak."""
    model, ex = _model("sdpa"), _examples()[:2]
    row = concat_row([e["input_ids"] for e in ex], [e["labels"] for e in ex])
    ids, pos = torch.tensor([row["input_ids"]]), torch.tensor([row["position_ids"]])
    alone = model(input_ids=torch.tensor([ex[1]["input_ids"]])).logits[0]
    with torch.no_grad():
        apart = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0, len(ex[0]["input_ids"]):]
        leaky = model(input_ids=ids, position_ids=pos, use_cache=True).logits[0, len(ex[0]["input_ids"]):]
    assert (apart - alone).abs().max().item() < 1e-4
    assert (leaky - alone).abs().max().item() > 1e-3
