"""The planner: per-GPU memory, the largest micro batch that fits, and time and cost for a training profile.

Run as: culbot plan --train-profile a6000x4 [--train-set train.micro_batch_size=4] [--examples 160000]

The model's shape (linear layers, embeddings, heads, KV heads) comes from its config.json, for any architecture
(tasks/architecture.py). The memory model (constants in pipeline_config/planner/planner.yaml, per-architecture
activation bytes in pipeline_config/models/families.yaml):
  weights      linear params × bytes (bf16 2, 8-bit 1, nf4 ≈0.52) + embeddings and output head (fp32 once quantised:
               peft upcasts them; once when tied); divided by the world size under ZeRO-3
  LoRA         trainable params × (4 weight + 4 grad + optimizer state: 8 AdamW, 2 8-bit AdamW); grads and states
               divided by the world size under ZeRO-2/3
  activations  one layer: b·s·(c_h·h + c_kv·h_kv + c_i·I) bytes (GPT-NeoX: 34·b·s·h, Korthikanti et al.), plus
               5·a·s²·b for eager attention (sdpa/flash store no scores);
               without checkpointing every layer's; with it, each layer's input (b·s·h·2) plus one layer recomputed,
               × backward_layer_factor
  logits       b·s·V × 10 bytes (16-bit logits, fp32 upcast, fp32 gradient)
  total        (sum) × (1 + fragmentation) + CUDA context; fits when ≤ GPU memory × usable_fraction

FLOP convention (for time and MFU): model FLOPs per token = 4·N (forward 2·N plus the input-gradient backward 2·N,
the weights being frozen) + 6·N_lora + 6·L·s·h (attention scores and values, forward and backward, causal half
counted). Recomputation under gradient checkpointing is not counted.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from culbot.pipeline_config.planner_schema import PlannerConfig, load_planner
from culbot.pipeline_config.schema import ConfigError
from culbot.pipeline_config.train_schema import TrainProfile

from . import architecture
from .architecture import ModelShape, model_config, shape_of

GB = 1e9
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
MEASURED_ON = "EleutherAI/polyglot-ko-12.8b"   # a GPU kind's tokens_per_s is for this model; other shapes scale by FLOPs per token
EIGHT_BIT_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "adamw_bnb_8bit", "paged_adamw_32bit_8bit")


class PlanDoesNotFit(RuntimeError):
    """The profile needs more GPU memory than the GPU has; the message names the largest micro batch that fits."""


def model_shape(profile: TrainProfile) -> ModelShape:
    """The base model's shape, from its config.json (tasks/architecture.py)."""
    return shape_of(model_config(profile.model.base, profile.model.revision))


def param_counts(shape: ModelShape) -> dict[str, int]:
    return {"linear": shape.linear_params, "embeddings": shape.embedding_params, "total": shape.total_params}


def lora_params(shape: ModelShape, profile: TrainProfile) -> int:
    return architecture.lora_params(shape, profile.lora.target_modules, profile.lora.r)


def _zero_stage(profile: TrainProfile) -> int:
    p = profile.deepspeed_path()
    if not p:
        return 0
    return int(json.loads(p.read_text()).get("zero_optimization", {}).get("stage", 0))


def memory_gb(profile: TrainProfile, planner: PlannerConfig, micro_batch: int | None = None,
              gradient_checkpointing: bool | None = None) -> dict[str, float]:
    """Per-GPU memory by component, in GB, and the total."""
    shape, mem, m = model_shape(profile), planner.memory, profile.model
    b = micro_batch or profile.train.micro_batch_size
    gc = m.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    s, h, L = profile.tokenize.cutoff_len, shape.hidden, shape.layers
    act = shape.family().activation_bytes
    world, zero = profile.hardware.gpus, _zero_stage(profile)
    dt = DTYPE_BYTES[m.dtype]
    counts = param_counts(shape)
    per_weight = {"none": dt, "8bit": 1.0, "4bit": 0.5 + (1 / 64 + 4 / (64 * 256) if m.bnb_4bit_use_double_quant else 4 / 64)}[m.quantization]
    emb_bytes = 4 if m.quantization != "none" else dt
    weights = counts["linear"] * per_weight + counts["embeddings"] * emb_bytes
    if zero == 3:
        weights /= world
    n_lora = lora_params(shape, profile)
    opt = 2 if profile.train.optim in EIGHT_BIT_OPTIMIZERS else 8
    lora = n_lora * 4 + n_lora * (4 + opt) / (world if zero >= 2 else 1)
    act_scale = dt / 2  # the 34-byte figure is for 16-bit activations
    layer = b * s * (act.per_hidden * h + act.per_kv * shape.kv_width + act.per_intermediate * shape.intermediate) * act_scale
    if m.attn_implementation == "eager":
        layer += mem.eager_attention_bytes * shape.heads * s * s * b * act_scale
    if gc:
        activations = L * b * s * h * dt + mem.backward_layer_factor * layer
    else:
        activations = L * layer + (mem.backward_layer_factor - 1) * layer
    logits = b * s * shape.vocab * mem.logits_bytes
    live = weights + lora + activations + logits
    parts = {"weights": weights, "lora_and_optimizer": lora, "activations": activations, "logits": logits,
             "fragmentation": live * mem.fragmentation, "cuda_context": mem.cuda_context_gb * GB}
    out = {k: v / GB for k, v in parts.items()}
    out["total"] = sum(out.values())
    return out


def gpu_kind(profile: TrainProfile, planner: PlannerConfig):
    name = profile.hardware.gpu_name
    if name not in planner.gpus:
        raise ConfigError(f"hardware.gpu_name {name!r}: unknown GPU kind; add it under 'gpus' in pipeline_config/planner/planner.yaml "
                          f"(known: {', '.join(planner.gpus)})")
    return planner.gpus[name]


def usable_gb(profile: TrainProfile, planner: PlannerConfig) -> float:
    cap = profile.hardware.gpu_memory_gb or gpu_kind(profile, planner).memory_gb
    return cap * planner.memory.usable_fraction


def largest_micro_batch(profile: TrainProfile, planner: PlannerConfig, gradient_checkpointing: bool | None = None) -> int:
    """Largest micro batch whose estimate fits (0: not even 1)."""
    limit, best = usable_gb(profile, planner), 0
    for b in range(1, 513):
        if memory_gb(profile, planner, b, gradient_checkpointing)["total"] > limit:
            break
        best = b
    return best


def flops_per_token(shape: ModelShape, profile: TrainProfile) -> float:
    """Model FLOPs per trained token (see the module docstring for the convention)."""
    n = param_counts(shape)["total"]
    return 4 * n + 6 * lora_params(shape, profile) + 6 * shape.layers * profile.tokenize.cutoff_len * shape.hidden


@dataclass
class Plan:
    profile: str
    gpu: str
    gpus: int
    memory_gb: dict[str, float]
    usable_gb: float | None
    fits: bool | None  # None on CPU: not checked
    largest_micro_batch: int | None
    largest_micro_batch_with_checkpointing: int | None
    verdict: str
    tokens_per_epoch: float
    tokens_per_s_per_gpu: float | None
    tokens_per_s_source: str
    hours: float | None
    cost_usd: float | None
    flops_per_token: float
    notes: list[str] = field(default_factory=list)
    epochs: float = 1.0

    def as_dict(self) -> dict:
        return asdict(self)


def plan(profile: TrainProfile, planner: PlannerConfig | None = None, *, examples: int = 160_000,
         tokens_per_example: float | None = None) -> Plan:
    """Memory verdict and time and cost for ``examples`` training rows (KULLM-v2 size by default)."""
    planner = planner or load_planner()
    shape, hw = model_shape(profile), profile.hardware
    mem = memory_gb(profile, planner)
    tok_ex = tokens_per_example or planner.time.average_tokens_per_example
    strategy = "packing" if profile.tokenize.packing else "group_by_length" if profile.tokenize.group_by_length else "random"
    eff = planner.time.real_token_share[strategy]  # computed tokens include the padding
    tokens_epoch = examples * tok_ex / eff
    fpt = flops_per_token(shape, profile)
    notes = []
    if hw.use_cpu:
        return Plan(profile.name, "cpu", hw.gpus, mem, None, None, None, None, "CPU: GPU memory not checked", tokens_epoch, None,
                    "none", None, None, fpt, ["CPU profile: memory and time are not planned"], profile.train.epochs)
    kind = gpu_kind(profile, planner)
    limit = usable_gb(profile, planner)
    fits = mem["total"] <= limit
    best = largest_micro_batch(profile, planner)
    best_gc = largest_micro_batch(profile, planner, gradient_checkpointing=True)
    if fits:
        verdict = f"fits: {mem['total']:.1f} of {limit:.1f} GB usable; largest micro batch that fits: {best}"
    else:
        verdict = (f"does not fit: {mem['total']:.1f} GB > {limit:.1f} GB usable; largest micro batch that fits: {best}"
                   + ("" if profile.model.gradient_checkpointing else f" ({best_gc} with gradient checkpointing)"))
    if kind.tokens_per_s:  # measured on 12.8b; scale by FLOPs per token for other shapes
        ref = flops_per_token(shape_of(model_config(MEASURED_ON)), profile)
        tps, source = kind.tokens_per_s * ref / fpt, "measured"
    else:
        tps, source = planner.time.assumed_mfu * kind.bf16_tflops * 1e12 / fpt, f"assumed {planner.time.assumed_mfu:.0%} MFU"
    if profile.model.gradient_checkpointing:
        tps *= 2 / 3  # one more forward per token: 4N -> 6N of hardware work (frozen weights)
    seconds = profile.train.epochs * tokens_epoch / (tps * hw.gpus)
    hours = seconds / 3600
    if fits and profile.model.gradient_checkpointing:
        notes += checkpointing_notes(profile, planner, hours)
    price = hw.hourly_usd if hw.hourly_usd is not None else kind.hourly_usd * hw.gpus
    return Plan(profile.name, hw.gpu_name, hw.gpus, mem, limit, fits, best, best_gc, verdict, tokens_epoch, tps, source, hours,
                hours * price, fpt, notes, profile.train.epochs)


def checkpointing_notes(profile: TrainProfile, planner: PlannerConfig, hours: float) -> list[str]:
    """Is checkpointing needed? The largest micro batch without it that divides the per-GPU batch."""
    t, gpus = profile.train, profile.hardware.gpus
    per_gpu = t.global_batch_size // gpus
    b = largest_micro_batch(profile, planner, gradient_checkpointing=False)
    b = max((m for m in range(1, b + 1) if per_gpu % m == 0), default=0)
    if b >= t.micro_batch_size:
        return ["gradient checkpointing is on but not needed at this micro batch: turning it off saves ~1/3 of the compute"]
    if b >= 1:
        return [f"without gradient checkpointing micro batch {b} fits (accumulation {per_gpu // b}): no recompute, about "
                f"{hours * 2 / 3:.1f} h instead of {hours:.1f} h at the same MFU; a smaller micro batch may lower MFU, so measure "
                f"(bench/bench_train.py) before setting model.gradient_checkpointing=false train.micro_batch_size={b}"]
    return []


def check_fits(profile: TrainProfile, planner: PlannerConfig | None = None) -> Plan:
    """Refuse a profile that does not fit, unless hardware.plan_check is off."""
    p = plan(profile, planner)
    if p.fits is False and profile.hardware.plan_check:
        raise PlanDoesNotFit(f"profile {profile.name}: {p.verdict}. Lower train.micro_batch_size (raise gradient accumulation), "
                             f"turn on model.gradient_checkpointing, or set hardware.plan_check=false to launch anyway.")
    return p


def plan_table(p: Plan) -> str:
    lines = [f"profile {p.profile}: {p.gpus}× {p.gpu}", "", "| component | GB per GPU |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in p.memory_gb.items() if k != "total"]
    lines += [f"| **total** | **{p.memory_gb['total']:.2f}** |"]
    if p.usable_gb is not None:
        lines += [f"| usable | {p.usable_gb:.2f} |"]
    lines += ["", f"verdict: {p.verdict}"]
    if p.hours is not None:
        lines += [f"time: {p.epochs:g} epoch(s) × {p.tokens_per_epoch / 1e6:.1f} M tokens at {p.tokens_per_s_per_gpu:,.0f} tokens/s per GPU × "
                  f"{p.gpus} GPU(s) ({p.tokens_per_s_source}): {p.hours:.1f} h in all, ${p.cost_usd:,.0f}"]
    lines += [f"FLOPs per token: {p.flops_per_token / 1e9:.1f} G (4·N + 6·N_lora + 6·L·s·h; recompute not counted)"]
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)
