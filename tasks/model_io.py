"""Base models and adapters on disk: resolving the base, the EOS check, dtypes, loading base + adapter.

Shared by tokenize, train (and its entrypoint), eval and merge-adapter, so each stage
loads models the same way. Heavy libraries are imported inside the functions.
"""
from __future__ import annotations

import logging
from pathlib import Path

from culbot.pipeline_config.train_schema import TINY_FAMILIES, ModelConfig

from .contracts import BaseModelRef
from .run_folder import read_run_card

log = logging.getLogger("culbot.model_io")

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class EosMismatch(ValueError):
    """The tokenizer's EOS id differs from the model config's (upstream hard-coded eos_token_id=2)."""


def torch_dtype(name: str):
    import torch

    return getattr(torch, TORCH_DTYPES[name])


def check_eos(tokenizer, model_config) -> int:
    tok_eos, cfg_eos = tokenizer.eos_token_id, model_config.eos_token_id
    if tok_eos is None or tok_eos != cfg_eos:
        raise EosMismatch(f"tokenizer eos_token_id={tok_eos} but model config eos_token_id={cfg_eos}; "
                          "pin a model revision whose tokenizer and config agree")
    return tok_eos


class BaseModelChanged(RuntimeError):
    """A local base model's files no longer match the manifest it was written with."""


def check_local_base(folder: Path) -> None:
    """A local base-model folder with a culbot manifest (a tiny model, a merged model) must still match it: an edited
    base would train or answer as another model than the run card names."""
    from . import _store

    folder = Path(folder)
    if (folder / _store.MANIFEST).is_file():
        problems = _store.verify(folder)
        if problems:
            raise BaseModelChanged(f"base model {folder} changed since it was written: {problems[0]}"
                                   f"{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}; restore it, or delete its "
                                   f"manifest.json to use it as it is now")


def resolve_base(model: ModelConfig, *, models_root: Path, samples_dir: Path) -> BaseModelRef:
    """The base model to load on this host. The tiny model is built on first use; a Hub id is pinned to its commit.

    A local base comes back with an absolute ``path``; writers store it relative to their folder
    (:meth:`BaseModelRef.relocated`).
    """
    if model.base in TINY_FAMILIES:
        from .tiny_model import build_tiny_model, sample_corpus

        family = TINY_FAMILIES[model.base]
        out = Path(models_root) / ("tiny" if family == "gpt_neox" else f"tiny-{family}")
        build_tiny_model(out, sample_corpus(samples_dir), family=family)
        return BaseModelRef(name=model.base, path=str(out.resolve()))
    if Path(model.base).exists():
        check_local_base(Path(model.base))
        return BaseModelRef(name=model.base, path=str(Path(model.base).resolve()))
    from huggingface_hub import HfApi

    return BaseModelRef(name=model.base, revision=HfApi().model_info(model.base, revision=model.revision).sha)


def _load_causal_lm(where: str, dtype: str | None, revision: str | None = None):
    """``dtype`` None: bf16 spread over the GPU(s) where there is one, fp32 on CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    gpu = torch.cuda.is_available()
    dt = torch_dtype(dtype) if dtype else (torch.bfloat16 if gpu else torch.float32)
    return AutoModelForCausalLM.from_pretrained(where, revision=revision, dtype=dt, device_map="auto" if gpu and dtype is None else None)


def load_adapted(adapter_dir: Path, dtype: str | None = None):
    """(base + adapter, tokenizer saved with the adapter, run card); the base comes from the card."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    card = read_run_card(adapter_dir)
    if card.base.path is not None:
        check_local_base(Path(card.base.location(adapter_dir)))
    base = _load_causal_lm(card.base.location(adapter_dir), dtype, card.base.revision)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    return model, AutoTokenizer.from_pretrained(str(adapter_dir)), card


def load_merged(folder: Path, dtype: str | None = None):
    """(merged model, its tokenizer, run card) of a merged-model folder."""
    from transformers import AutoTokenizer

    return _load_causal_lm(str(folder), dtype).eval(), AutoTokenizer.from_pretrained(str(folder)), read_run_card(folder)
