"""Training throughput, MFU and peak memory: LoRA steps on randomly initialised models of real shapes (no download).

Run as: python bench/bench_train.py [--shapes 1.3b,5.8b,12.8b] [--micro 4] [--seq 1024] [--steps 10] [--out bench/results/train.json]
        python bench/bench_train.py --profile laptop-6gb [--steps 3]

--shapes: on a GPU it builds polyglot-ko shapes from their config.json (pipeline_config/models/configs/) in bf16 with
sdpa, LoRA on the family's default targets as in the profiles, packed full rows of `--seq` tokens holding
`--examples-per-row` examples each (position_ids restart at each, as tokenize.packing feeds them), fused AdamW, and
prints tokens/s per GPU, peak GPU memory, achieved TFLOP/s and MFU against the GPU's dense bf16 peak from
pipeline_config/planner/planner.yaml, next to the planner's memory estimate. On CPU it runs scaled-down shapes
(`--shapes tiny,small`) in fp32 so CI checks that it works; CPU MFU is not meaningful and is not printed.

--profile: one training profile's own set-up on a random model of its base's shape, loaded through the training
entrypoint's load_model and apply_lora (quantisation such as QLoRA nf4 with double quant, gradient checkpointing,
the profile's optimizer, micro batch and cutoff), and its peak memory next to the planner's estimate for it.

FLOP convention: model FLOPs per token = 4·N (forward 2·N + input-gradient backward 2·N for frozen weights)
+ 6·N_lora + 6·L·s·h (attention, causal half counted); recomputation under gradient checkpointing is not counted.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._report import write_results  # noqa: E402

CPU_SHAPES = {"tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256},
              "small": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024}}


OTHER_SHAPES = {"llama3-8b": "beomi/Llama-3-Open-Ko-8B-Instruct-preview", "qwen2-7b": "Qwen/Qwen2-7B-Instruct"}


def shape_config(name: str) -> dict:
    """config.json of a named shape: a polyglot-ko size (1.3b ...), llama3-8b, qwen2-7b, or a scaled-down CPU one."""
    from culbot.tasks.architecture import model_config

    if name in CPU_SHAPES:
        return {**model_config("EleutherAI/polyglot-ko-1.3b"), **CPU_SHAPES[name]}
    return model_config(OTHER_SHAPES.get(name, f"EleutherAI/polyglot-ko-{name}"))


def build(config: dict, dtype, device, attn: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    # as in training: no KV cache, so packed position_ids mask each example
    cfg = AutoConfig.for_model(**{**config, "attn_implementation": attn, "use_cache": False})
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    return model


def packed_positions(micro: int, seq: int, per_row: int, seed: int = 0):
    """position_ids of rows holding ``per_row`` examples of random lengths (restarts at each boundary)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(micro):
        cuts = sorted(torch.randperm(seq - 1, generator=g)[:per_row - 1].add(1).tolist())
        starts = [0] + cuts
        rows.append(torch.cat([torch.arange(b - a) for a, b in zip(starts, cuts + [seq])]))
    return torch.stack(rows)


def timed_steps(model, opt, batch, *, steps: int, warmup: int, amp=None) -> tuple[float, object]:
    """(median seconds per optimizer step after ``warmup`` steps, the last loss)."""
    import contextlib

    import torch

    gpu = torch.cuda.is_available()
    times = []
    for i in range(warmup + steps):
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with amp or contextlib.nullcontext():
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if gpu:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], loss


def run_shape(name: str, config: dict, *, micro: int, seq: int, steps: int, warmup: int, gc: bool, compile_: bool,
              per_row: int = 1) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from culbot.pipeline_config.planner_schema import load_planner
    from culbot.pipeline_config.train_schema import load_train_profile
    from culbot.tasks.architecture import lora_targets, shape_of
    from culbot.tasks.plan import flops_per_token, memory_gb

    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    model = build(config, dtype, device, "sdpa")
    shape = shape_of(config)
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=lora_targets(shape, None), task_type="CAUSAL_LM"))
    if compile_:
        model = torch.compile(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=gpu)
    ids = torch.randint(3, shape.vocab, (micro, seq), device=device)
    batch = {"input_ids": ids, "labels": ids, "position_ids": packed_positions(micro, seq, per_row).to(device)}
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    step, loss = timed_steps(model, opt, batch, steps=steps, warmup=warmup)
    tps = micro * seq / step
    folder = Path(tempfile.mkdtemp(prefix="bench-shape-"))
    (folder / "config.json").write_text(json.dumps(config))   # the planner reads the shape from config.json, as for any base
    prof = load_train_profile("a6000x4", [f"model.base={folder}", "lora.target_modules=null", f"tokenize.cutoff_len={seq}", f"train.micro_batch_size={micro}",
                                          "train.global_batch_size=" + str(micro * 4), f"model.gradient_checkpointing={str(gc).lower()}"])
    fpt = flops_per_token(shape, prof)
    out = {"shape": name, "hidden": shape.hidden, "layers": shape.layers, "vocab": shape.vocab, "micro_batch": micro, "seq": seq,
           "examples_per_row": per_row, "gradient_checkpointing": gc, "torch_compile": compile_,
           "device": torch.cuda.get_device_name() if gpu else "cpu", "dtype": str(dtype).replace("torch.", ""),
           "step_s": round(step, 4), "tokens_per_s": round(tps, 1), "flops_per_token": fpt, "tflops": round(tps * fpt / 1e12, 3),
           "loss": round(loss.item(), 4)}
    if gpu:
        planner = load_planner()
        out.update(gpu_memory(torch))
        kind = gpu_kind_of(planner, torch.cuda.get_device_name())
        if kind:
            out["gpu_kind"] = kind
            out["mfu"] = round(out["tflops"] / planner.gpus[kind].bf16_tflops, 4)
        out["planner_estimate_gb"] = round(memory_gb(prof, planner)["total"], 2)
    del model, opt
    if gpu:
        torch.cuda.empty_cache()
    return out


def gpu_memory(torch) -> dict:
    return {"peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2), "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 2)}


def gpu_kind_of(planner, device_name: str) -> str | None:
    return next((k for k in planner.gpus if k.split()[0] in device_name), None)


def run_profile(name: str, *, steps: int, warmup: int) -> dict:
    """A profile's set-up (tasks/train_entry.load_model + apply_lora, its optimizer, micro batch and cutoff) on a random
    model of its base's shape, saved once so quantisation loads it as it would the real weights."""
    import torch

    from culbot.pipeline_config.planner_schema import load_planner
    from culbot.pipeline_config.train_schema import load_train_profile
    from culbot.tasks.architecture import model_config
    from culbot.tasks.plan import memory_gb
    from culbot.tasks.train_entry import apply_lora, load_model

    prof = load_train_profile(name)
    gpu = torch.cuda.is_available()
    use_cpu = prof.hardware.use_cpu or not gpu
    config = model_config(prof.model.base, prof.model.revision)
    save_dtype = torch.float32 if use_cpu else torch.bfloat16
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as folder:
        t0 = time.perf_counter()
        build(config, save_dtype, "cpu", prof.model.attn_implementation).save_pretrained(folder)
        build_s = time.perf_counter() - t0
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        model = load_model(prof.model, folder, None, use_cpu)
        if not use_cpu and prof.model.quantization == "none":
            model = model.to("cuda")
        model, targets = apply_lora(model, prof.lora)
    device = "cpu" if use_cpu else "cuda"
    params = [p for p in model.parameters() if p.requires_grad]
    if prof.train.optim in ("paged_adamw_8bit", "adamw_bnb_8bit", "adamw_8bit") and not use_cpu:
        import bitsandbytes as bnb

        opt = (bnb.optim.PagedAdamW8bit if prof.train.optim.startswith("paged") else bnb.optim.AdamW8bit)(params, lr=prof.train.learning_rate)
    else:
        opt = torch.optim.AdamW(params, lr=prof.train.learning_rate)
    micro, seq = prof.train.micro_batch_size, prof.tokenize.cutoff_len
    ids = torch.randint(3, config["vocab_size"], (micro, seq), device=device)
    batch = {"input_ids": ids, "labels": ids, "position_ids": packed_positions(micro, seq, 3).to(device)}
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if not use_cpu and prof.model.dtype == "bf16" else torch.autocast("cpu", enabled=False)
    model.train()
    step, loss = timed_steps(model, opt, batch, steps=steps, warmup=warmup, amp=amp)
    planner = load_planner()
    est = memory_gb(prof, planner)
    out = {"profile": name, "base": prof.model.base, "quantization": prof.model.quantization, "gradient_checkpointing": prof.model.gradient_checkpointing,
           "optim": prof.train.optim, "lora_targets": targets, "micro_batch": micro, "seq": seq, "device": torch.cuda.get_device_name() if gpu else "cpu",
           "steps": steps, "step_s": round(step, 4), "tokens_per_s": round(micro * seq / step, 1), "loss": round(loss.item(), 4),
           "build_s": round(build_s, 1), "planner_estimate_gb": {k: round(v, 3) for k, v in est.items()}}
    if gpu:
        out.update(gpu_memory(torch))
        one = load_train_profile(name, ["train.micro_batch_size=1", f"train.global_batch_size={prof.train.global_batch_size // micro}"])
        out["planner_estimate_micro_1_gb"] = round(memory_gb(one, planner)["total"], 3)
    return out


def print_profile(r: dict) -> None:
    est = r["planner_estimate_gb"]
    print(f"\nprofile {r['profile']}: {r['base']} ({r['quantization']}, checkpointing {r['gradient_checkpointing']}, {r['optim']}), "
          f"micro {r['micro_batch']} × {r['seq']} tokens on {r['device']}")
    print(f"  step {r['step_s']:.3f} s, {r['tokens_per_s']:,.0f} tokens/s, loss {r['loss']}")
    if "peak_memory_gb" in r:
        print(f"  peak GPU memory: {r['peak_memory_gb']} GB allocated, {r['peak_reserved_gb']} GB reserved by the caching allocator")
    print(f"  planner: {est['total']} GB in all = weights {est['weights']} + LoRA/optimizer {est['lora_and_optimizer']} + activations "
          f"{est['activations']} + logits {est['logits']} + fragmentation {est['fragmentation']} + CUDA context {est['cuda_context']}")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help="comma-separated: 1.3b, 5.8b, 12.8b, llama3-8b, qwen2-7b (GPU) or tiny, small (CPU). Default by device.")
    ap.add_argument("--micro", type=int, default=None, help="micro batch (default: 4 on GPU, 2 on CPU)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (default: 1024 on GPU, 256 on CPU)")
    ap.add_argument("--examples-per-row", type=int, default=3, help="examples packed per row (1: one example fills the row)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (measured, off by default)")
    ap.add_argument("--profile", default=None, help="measure a training profile's own set-up (e.g. laptop-6gb: QLoRA) instead of --shapes")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train.json")
    args = ap.parse_args(argv)
    import torch

    if args.profile:
        res = [run_profile(args.profile, steps=args.steps, warmup=args.warmup)]
        print(json.dumps(res[0], indent=1), flush=True)
        print_profile(res[0])
        write_results(args.out, res)
        return res
    gpu = torch.cuda.is_available()
    names = (args.shapes or ("1.3b,5.8b,12.8b" if gpu else "tiny,small")).split(",")
    shapes = {n: shape_config(n) for n in names}
    res = []
    for n, s in shapes.items():
        try:
            res.append(run_shape(n, s, micro=args.micro or (4 if gpu else 2), seq=args.seq or (1024 if gpu else 256), steps=args.steps,
                                 warmup=args.warmup, gc=args.gradient_checkpointing, compile_=args.compile,
                                 per_row=args.examples_per_row))
        except torch.OutOfMemoryError:
            res.append({"shape": n, "error": "out of memory"})
            torch.cuda.empty_cache()
        print(json.dumps(res[-1]), flush=True)
    print(f"\nLoRA training throughput, {args.examples_per_row} packed examples per row "
          "(model FLOPs/token = 4·N + 6·N_lora + 6·L·s·h; recompute not counted)")
    print(f"  {'shape':<6} {'device':<26} {'micro×seq':>10} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GB':>8} {'plan GB':>8}")
    for r in res:
        if "error" in r:
            print(f"  {r['shape']:<6} {r['error']}")
            continue
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a"
        print(f"  {r['shape']:<6} {r['device'][:26]:<26} {str(r['micro_batch']) + '×' + str(r['seq']):>10} {r['tokens_per_s']:>10,.0f} "
              f"{r['tflops']:>8.2f} {mfu:>6} {r.get('peak_memory_gb', 'n/a'):>8} {r.get('planner_estimate_gb', 'n/a'):>8}")
    write_results(args.out, res)
    return res


if __name__ == "__main__":
    main()
