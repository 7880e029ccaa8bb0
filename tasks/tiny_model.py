"""A tiny GPT-NeoX with polyglot-ko's architecture and a byte-level BPE tokenizer, for CPU runs and CI.

Run as: culbot tiny-model --out artifacts/models/tiny

Both are saved with save_pretrained and loaded back through the same
from_pretrained path that loads EleutherAI/polyglot-ko-12.8b for users. Special
tokens mirror polyglot-ko: bos 0, eos 2, and pad == eos == <|endoftext|>.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

from . import _store
from .documents import read_directory
from .contracts import Manifest

log = logging.getLogger("culbot.tiny_model")

SPECIAL_TOKENS = ["<|startoftext|>", "<|unk|>", "<|endoftext|>"]  # ids 0, 1, 2 as in polyglot-ko
TINY_SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
              "rotary_pct": 0.5, "max_position_embeddings": 2048}


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
        texts += [v for k, v in t.items() if k.startswith("prompt") and isinstance(v, str)]
    return texts


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|unk|>", pad_token="<|endoftext|>")


def build_tiny_model(out_dir: Path, corpus: list[str], *, vocab_size: int = 1024, seed: int = 0, **shape) -> Manifest:
    """Train the tokenizer, build the model from a config, save both; a second call with the same inputs is a no-op."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    out_dir = Path(out_dir)
    spec = {"corpus": _store.hash_json(corpus), "vocab_size": vocab_size, "seed": seed, **TINY_SHAPE, **shape}
    key = _store.hash_json(spec)
    m = _store.read_manifest(out_dir)
    if m and m.inputs.get("spec_hash") == key and _store.is_complete(out_dir):
        return m
    staging = _store.new_staging_dir(out_dir.parent, out_dir.name)
    tokenizer = build_tokenizer(corpus, vocab_size)
    config = GPTNeoXConfig(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=2, pad_token_id=2,
                        use_parallel_residual=True, tie_word_embeddings=False, **{**TINY_SHAPE, **shape})
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(config)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    _store.write_manifest(staging, stage="tiny-model", inputs={"spec_hash": key}, config=spec,
                          counts={"parameters": sum(p.numel() for p in model.parameters()), "vocab": len(tokenizer)})
    _store.promote(staging, out_dir)
    log.info("tiny GPT-NeoX (%d parameters, vocab %d) at %s", sum(p.numel() for p in model.parameters()), len(tokenizer), out_dir)
    return _store.read_manifest(out_dir)
