"""What a base model is made of, read from its config.json: shape, linear layers and LoRA targets, for any architecture.

The config comes from a local folder, a shipped copy (pipeline_config/models/configs/), or the
Hub (config.json only, a few KB, cached by huggingface_hub), or the tiny models' own builder.
The linear layers are read off the model built on the meta device (no memory, about a second
for 8B), so the planner and the LoRA target check know exactly the modules peft will see.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from culbot.pipeline_config.model_schema import CONFIGS_DIR, Family, family
from culbot.pipeline_config.schema import ConfigError
from culbot.pipeline_config.train_schema import TINY_FAMILIES

OUTPUT_HEADS = ("lm_head", "embed_out")   # never a LoRA target: peft's all-linear leaves the output layer out too


class LinearLayer(BaseModel):
    model_config = ConfigDict(frozen=True)

    count: int
    in_features: int
    out_features: int

    @property
    def params(self) -> int:
        return self.count * self.in_features * self.out_features


class ModelShape(BaseModel):
    """The numbers the planner needs, all read from config.json and the meta-device model."""

    model_config = ConfigDict(frozen=True)

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    linear: dict[str, LinearLayer]   # by module name (the last part of its path), output head excluded
    embedding_params: int            # input embeddings + output head (once when tied)

    @property
    def kv_width(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    @property
    def linear_params(self) -> int:
        return sum(m.params for m in self.linear.values())

    @property
    def total_params(self) -> int:
        return self.linear_params + self.embedding_params

    def family(self) -> Family:
        return family(self.model_type)


def shipped_config_path(hub_id: str) -> Path:
    return CONFIGS_DIR / (hub_id.replace("/", "--") + ".json")


def model_config(base: str, revision: str | None = "main") -> dict:
    """config.json of ``base`` as a dict: a tiny model, a local folder, a shipped copy, or the Hub's (cached)."""
    if base in TINY_FAMILIES:
        from .tiny_model import build_tokenizer, tiny_config

        fam = TINY_FAMILIES[base]
        return tiny_config(fam, build_tokenizer([], 300, fam), vocab_size=1024).to_dict()
    local = Path(base) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    if shipped_config_path(base).is_file():
        return json.loads(shipped_config_path(base).read_text())
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(base, "config.json", revision=revision)).read_text())
    except Exception as e:
        raise ConfigError(f"model.base {base!r}: no config.json found ({type(e).__name__}: {e}); give a local folder, "
                          f"or put its config.json at {shipped_config_path(base)}") from None


@lru_cache(maxsize=16)
def _shape(config_json: str) -> ModelShape:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads(config_json)
    if "model_type" not in raw:
        raise ConfigError("config.json has no model_type")
    cfg = AutoConfig.for_model(**raw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    linear: dict[str, list[int]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            short = name.rsplit(".", 1)[-1]
            if short in OUTPUT_HEADS:
                continue
            entry = linear.setdefault(short, [0, mod.in_features, mod.out_features])
            entry[0] += 1
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    emb = inp.weight.numel() + (0 if out is None or out.weight is inp.weight else out.weight.numel())
    heads = cfg.num_attention_heads
    return ModelShape(model_type=cfg.model_type, hidden=cfg.hidden_size, layers=cfg.num_hidden_layers, heads=heads,
                      kv_heads=getattr(cfg, "num_key_value_heads", None) or heads, intermediate=cfg.intermediate_size,
                      vocab=cfg.vocab_size, tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
                      linear={k: LinearLayer(count=c, in_features=i, out_features=o) for k, (c, i, o) in linear.items()},
                      embedding_params=emb)


def shape_of(config: dict) -> ModelShape:
    """The shape of the model a config.json describes (cached per config)."""
    return _shape(json.dumps(config, sort_keys=True))


def lora_targets(shape: ModelShape, targets: list[str] | str | None) -> list[str]:
    """The linear layers LoRA adapts: the family's default (None), every linear layer but the output ('all-linear'),
    or the names given, each checked against the model's own module names."""
    if targets is None:
        targets = shape.family().lora_targets
    if targets == "all-linear":
        return sorted(shape.linear)
    unknown = [t for t in targets if t not in shape.linear]
    if unknown:
        raise ConfigError(f"lora.target_modules: {unknown} are not linear layers of this {shape.model_type} model "
                          f"(its linear layers: {', '.join(sorted(shape.linear))}; or 'all-linear')")
    return list(targets)


def lora_params(shape: ModelShape, targets: list[str] | str | None, r: int) -> int:
    """Trainable LoRA parameters: r·(in + out) per adapted layer."""
    return sum(r * (shape.linear[t].in_features + shape.linear[t].out_features) * shape.linear[t].count
               for t in lora_targets(shape, targets))
