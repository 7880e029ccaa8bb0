"""Typed per-architecture defaults (pipeline_config/models/families.yaml), keyed by config.json's model_type.

A profile that names no LoRA targets gets its family's; a tokenizer without a pad token gets the
first of its family's pad candidates; the planner's activation model and the model card's tags
come from here too. The code has no branch per architecture.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field

from .loader import PACKAGE_DIR, ConfigError, Section, load_yaml

MODELS_DIR = PACKAGE_DIR / "models"
FAMILIES_FILE = MODELS_DIR / "families.yaml"
CONFIGS_DIR = MODELS_DIR / "configs"


class ActivationBytes(Section):
    """Bytes of one layer's saved activations per token, 16-bit: per_hidden·h + per_kv·h_kv + per_intermediate·I."""

    per_hidden: float = Field(gt=0, description="Bytes per hidden unit (norm inputs, attention input and output, residual masks).")
    per_kv: float = Field(ge=0, description="Bytes per unit of the key/value width (heads_kv × head_dim): K and V outputs.")
    per_intermediate: float = Field(ge=0, description="Bytes per MLP unit (GELU: input and output; SwiGLU: gate, up, activation, product).")


class Family(Section):
    lora_targets: list[str] = Field(description="LoRA target modules when the profile names none (lora.target_modules unset).")
    pad_candidates: list[str] = Field([], description="When the tokenizer has no pad token: the first of these in its vocabulary becomes the pad (never learned: padded labels are -100); none found: the EOS, with a warning.")
    activation_bytes: ActivationBytes = Field(description="The planner's activation model for this architecture.")
    tags: list[str] = Field([], description="Model card tags for this architecture.")


@lru_cache(maxsize=4)
def _load(path: Path) -> dict[str, Family]:
    raw = load_yaml(path)
    out = {}
    for name, body in raw.items():
        try:
            out[name] = Family.model_validate(body)
        except Exception as e:
            raise ConfigError(f"{path}: family {name!r}: {e}") from None
    return out


def families(path: Path = FAMILIES_FILE) -> dict[str, Family]:
    return _load(Path(path))


def family(model_type: str, path: Path = FAMILIES_FILE) -> Family:
    """The defaults of an architecture; an unknown one is a config error that says where to add it."""
    known = families(path)
    if model_type not in known:
        raise ConfigError(f"model_type {model_type!r} has no entry in {path} (known: {', '.join(known)}); "
                          "add its LoRA targets, pad candidates and activation bytes there")
    return known[model_type]
