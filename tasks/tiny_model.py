"""Tiny models of the three families Culbot trains, with byte-level BPE tokenizers, for CPU runs and CI.

Run as: culbot tiny-model --out artifacts/models/tiny [--family gpt_neox|llama|qwen2]

Each is saved with save_pretrained and loaded back through the same from_pretrained path that
loads the real model for users. Their special tokens mirror the real ones:
  gpt_neox  polyglot-ko: bos 0, eos 2, pad == eos == <|endoftext|>, no BOS added, no chat template
  llama     Llama-3 (base, as Llama-3-Open-Ko): <|begin_of_text|> added before every text, eos <|end_of_text|>,
            NO pad token, and the Llama-3 chat template, whose turns end with <|eot_id|>
  qwen2     Qwen2-Instruct: no BOS, eos <|im_end|>, pad <|endoftext|>, the ChatML chat template
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

from . import _store
from .documents import read_directory
from .contracts import Manifest

log = logging.getLogger("culbot.tiny_model")

# The Llama-3 Instruct chat template, as Meta published it in tokenizer_config.json.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Qwen2-Instruct's ChatML template, as published.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

FAMILIES = {
    "gpt_neox": {"special": ["<|startoftext|>", "<|unk|>", "<|endoftext|>"],   # ids 0, 1, 2 as in polyglot-ko
                 "bos": "<|startoftext|>", "eos": "<|endoftext|>", "pad": "<|endoftext|>", "unk": "<|unk|>",
                 "add_bos": False, "chat_template": None},
    "llama": {"special": ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|start_header_id|>",
                          "<|end_header_id|>", "<|eot_id|>"],
              "bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "pad": None, "unk": None,
              "add_bos": True, "chat_template": LLAMA3_CHAT_TEMPLATE},
    "qwen2": {"special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              "bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "unk": None,
              "add_bos": False, "chat_template": QWEN2_CHAT_TEMPLATE},
}
TINY_SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
              "max_position_embeddings": 2048}
FAMILY_SHAPE = {"gpt_neox": {"rotary_pct": 0.5, "use_parallel_residual": True},        # polyglot-ko
                "llama": {"num_key_value_heads": 2, "rope_theta": 500000.0},            # grouped-query attention, as Llama-3
                "qwen2": {"num_key_value_heads": 2}}


def sample_corpus(samples_dir: Path) -> list[str]:
    """Korean sentences from the shipped samples: KULLM rows, CBNU documents, univ100 questions and answers."""
    samples_dir = Path(samples_dir)
    texts: list[str] = []
    for row in _store.read_jsonl(samples_dir / "kullm_sample.jsonl"):
        texts += [v for k, v in row.items() if k != "id" and isinstance(v, str) and v]
    for page in read_directory(samples_dir / "cbnu_pages")[0]:   # decoded (UTF-8 or CP949) and extracted like the crawl does
        texts += [page["title"]] + [line for line in page["text"].splitlines() if line.strip()]
    for p in sorted((samples_dir / "univ100" / "detail").glob("*.json")):
        r = _store.read_json(p)["result"]
        texts += [r["question"]["title"], r["question"]["text"]] + [a["text"] for a in r["answers"] if a["text"]]
    # The prompt templates' fixed text, so formatted prompts tokenize compactly.
    for p in sorted((Path(__file__).resolve().parent.parent / "pipeline_config" / "templates").glob("*.json")):
        t = _store.read_json(p)
        texts += [v for k, v in t.items() if (k.startswith("prompt") or k == "system") and isinstance(v, str)]
    return texts


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 1024, family: str = "gpt_neox"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    f = FAMILIES[family]
    tok = Tokenizer(models.BPE(unk_token=f["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=f["special"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)   # its bars print blank lines into logs
    tok.train_from_iterator(list(corpus), trainer)
    if f["add_bos"]:   # as Llama-3's tokenizer.json: BOS before every text encoded with special tokens
        bos = f["bos"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=f["bos"], eos_token=f["eos"], unk_token=f["unk"], pad_token=f["pad"],
                                  additional_special_tokens=[s for s in f["special"] if s not in (f["bos"], f["eos"], f["unk"], f["pad"])])
    if f["chat_template"]:
        out.chat_template = f["chat_template"]
    return out


def tiny_config(family: str, tokenizer, **shape):
    """The transformers config of a tiny model of ``family`` over ``tokenizer``'s vocabulary."""
    from transformers import AutoConfig

    f = FAMILIES[family]
    ids = {k: tokenizer.convert_tokens_to_ids(f[k]) if f[k] else None for k in ("bos", "eos", "pad")}
    return AutoConfig.for_model(family, bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
                                **{"vocab_size": len(tokenizer), "tie_word_embeddings": False, **TINY_SHAPE, **FAMILY_SHAPE[family], **shape})


def build_tiny_model(out_dir: Path, corpus: list[str], *, vocab_size: int = 1024, seed: int = 0, family: str = "gpt_neox",
                     **shape) -> Manifest:
    """Train the tokenizer, build the model from a config, save both; a second call with the same inputs is a no-op."""
    import torch
    from transformers import AutoModelForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"no tiny model of family {family!r}; families: {', '.join(FAMILIES)}")
    out_dir = Path(out_dir)
    spec = {"corpus": _store.hash_json(corpus), "vocab_size": vocab_size, "seed": seed, "family": family, "special": FAMILIES[family],
            **TINY_SHAPE, **FAMILY_SHAPE[family], **shape}
    key = _store.hash_json(spec)
    m = _store.read_manifest(out_dir)
    if m and m.inputs.get("spec_hash") == key and _store.is_complete(out_dir):
        return m
    staging = _store.new_staging_dir(out_dir.parent, out_dir.name)
    tokenizer = build_tokenizer(corpus, vocab_size, family)
    config = tiny_config(family, tokenizer, **shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    n = sum(p.numel() for p in model.parameters())
    _store.write_manifest(staging, stage="tiny-model", inputs={"spec_hash": key}, config=spec, counts={"parameters": n, "vocab": len(tokenizer)})
    _store.promote(staging, out_dir)
    log.info("tiny %s (%d parameters, vocab %d) at %s", family, n, len(tokenizer), out_dir)
    return _store.read_manifest(out_dir)
