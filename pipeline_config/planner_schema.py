"""Typed configuration of the planner: GPU kinds and the constants of the memory model (model shapes come from config.json).

Loaded from pipeline_config/planner/planner.yaml. The memory model itself is in tasks/plan.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from .loader import PACKAGE_DIR, ConfigError, Section, load_config

PLANNER_FILE = PACKAGE_DIR / "planner" / "planner.yaml"


class GpuKind(Section):
    memory_gb: float = Field(ge=0, description="Memory per GPU in GB (10^9 bytes), as sold.")
    bf16_tflops: float = Field(ge=0, description="Dense bf16 tensor-core peak per GPU, TFLOP/s (no sparsity); the MFU denominator.")
    tokens_per_s: float | None = Field(None, gt=0, description="Measured training tokens/s per GPU for polyglot-ko-12.8b LoRA; None: estimate from assumed MFU.")
    hourly_usd: float = Field(0, ge=0, description="Price of one such GPU per hour, for cost estimates (a profile's hardware.hourly_usd wins).")


class MemoryModel(Section):
    usable_fraction: float = Field(0.94, gt=0, le=1, description="Share of a GPU's memory a process can allocate (driver, ECC and reserved pages take the rest).")
    cuda_context_gb: float = Field(1.0, ge=0, description="CUDA context, cuBLAS workspaces and NCCL buffers per process.")
    fragmentation: float = Field(0.10, ge=0, description="Caching-allocator overhead on top of live tensors, as a fraction.")
    eager_attention_bytes: float = Field(5, ge=0, description="Bytes per head × seq² × batch for eager attention's score tensors; sdpa/flash keep none.")
    logits_bytes: float = Field(10, gt=0, description="Bytes per token × vocab around the loss: 16-bit logits, fp32 upcast and fp32 gradient.")
    backward_layer_factor: float = Field(2.0, ge=1, description="Peak of one layer's backward relative to its forward activations (gradients beside activations).")


class TimeModel(Section):
    assumed_mfu: float = Field(0.35, gt=0, le=1, description="MFU assumed when a GPU kind has no measured tokens/s.")
    average_tokens_per_example: float = Field(330, gt=0, description="Tokens per example when no tokenized dataset is given (KULLM-v2-like data).")
    real_token_share: dict[Literal["random", "group_by_length", "packing"], float] = Field(
        default_factory=lambda: {"random": 0.425, "group_by_length": 0.971, "packing": 0.998},
        description="Real / computed tokens per batching strategy at micro 8, cutoff 1024 (measured by bench/bench_prep.py).")


class PlannerConfig(Section):
    gpus: dict[str, GpuKind] = Field(description="GPU kinds by the name profiles use in hardware.gpu_name.")
    memory: MemoryModel = Field(default_factory=MemoryModel, description="Constants of the memory model.")
    time: TimeModel = Field(default_factory=TimeModel, description="Constants of the time model.")


def load_planner(path: str | Path = PLANNER_FILE, overrides: list[str] | tuple[str, ...] = ()) -> PlannerConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: planner config not found")
    return load_config(PlannerConfig, p, overrides, override_flag="planner override")
