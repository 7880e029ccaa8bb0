"""Training throughput and MFU: LoRA steps on a randomly initialised GPT-NeoX with polyglot-ko shapes.

Run as: python bench/bench_train.py [--shapes 1.3b,5.8b,12.8b] [--micro 4] [--seq 1024] [--steps 10] [--out bench/results/train.json]

On a GPU it builds the real polyglot-ko shapes (hidden, layers, heads, vocab 30080, rotary 0.5; no download) in bf16
with sdpa, LoRA on query_key_value as in the profiles, packed full rows of `--seq` tokens holding
`--examples-per-row` examples each (position_ids restart at each, as data.packing feeds them), fused AdamW, and prints
tokens/s per GPU, peak GPU memory, achieved TFLOP/s and MFU against the GPU's dense bf16 peak from
pipeline_config/planner/planner.yaml, next to the planner's memory estimate. On CPU it runs scaled-down shapes
(`--shapes tiny,small`) in fp32 so CI checks that it works; CPU MFU is not meaningful and is not printed.

FLOP convention: model FLOPs per token = 4·N (forward 2·N + input-gradient backward 2·N for frozen weights)
+ 6·N_lora + 6·L·s·h (attention, causal half counted); recomputation under gradient checkpointing is not counted.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._report import write_results  # noqa: E402

CPU_SHAPES = {"tiny": {"hidden": 64, "layers": 2, "heads": 4, "intermediate": 256, "vocab": 30080},
              "small": {"hidden": 256, "layers": 4, "heads": 4, "intermediate": 1024, "vocab": 30080}}


def build(shape: dict, dtype, device, attn: str):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                        num_attention_heads=shape["heads"], intermediate_size=shape["intermediate"], rotary_pct=0.5,
                        max_position_embeddings=2048, use_parallel_residual=True, bos_token_id=0, eos_token_id=2,
                        attn_implementation=attn, use_cache=False)  # as in training: packed position_ids then mask per example
    torch.manual_seed(0)
    with torch.device(device):
        model = GPTNeoXForCausalLM(cfg).to(dtype)
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


def run_shape(name: str, shape: dict, *, micro: int, seq: int, steps: int, warmup: int, gc: bool, compile_: bool,
              per_row: int = 1) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from culbot.pipeline_config.planner_schema import ModelShape, load_planner
    from culbot.pipeline_config.train_schema import load_train_profile
    from culbot.tasks.plan import flops_per_token, memory_gb

    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    model = build(shape, dtype, device, "sdpa")
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["query_key_value"], task_type="CAUSAL_LM"))
    if compile_:
        model = torch.compile(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=gpu)
    ids = torch.randint(3, shape["vocab"], (micro, seq), device=device)
    batch = {"input_ids": ids, "labels": ids, "position_ids": packed_positions(micro, seq, per_row).to(device)}
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if gpu:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]  # median step time
    tps = micro * seq / step
    ms = ModelShape(**shape)
    prof = load_train_profile("a6000x4", [f"data.cutoff_len={seq}", f"train.micro_batch_size={micro}", "train.global_batch_size=" + str(micro * 4),
                                          f"model.gradient_checkpointing={str(gc).lower()}"])
    fpt = flops_per_token(ms, prof)
    out = {"shape": name, **shape, "micro_batch": micro, "seq": seq, "examples_per_row": per_row, "gradient_checkpointing": gc, "torch_compile": compile_,
           "device": torch.cuda.get_device_name() if gpu else "cpu", "dtype": str(dtype).replace("torch.", ""),
           "step_s": round(step, 4), "tokens_per_s": round(tps, 1), "flops_per_token": fpt, "tflops": round(tps * fpt / 1e12, 3),
           "loss": round(loss.item(), 4)}
    if gpu:
        planner = load_planner()
        out["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        out["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 2)
        kind = next((k for k in planner.gpus if k.split()[0] in torch.cuda.get_device_name()), None)
        if kind:
            out["gpu_kind"] = kind
            out["mfu"] = round(out["tflops"] / planner.gpus[kind].bf16_tflops, 4)
        planner.shapes["bench"] = ms
        prof.model.base = "bench"
        out["planner_estimate_gb"] = round(memory_gb(prof, planner)["total"], 2)
    del model, opt
    if gpu:
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help="comma-separated: 1.3b, 5.8b, 12.8b (GPU) or tiny, small (CPU). Default by device.")
    ap.add_argument("--micro", type=int, default=None, help="micro batch (default: 4 on GPU, 2 on CPU)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (default: 1024 on GPU, 256 on CPU)")
    ap.add_argument("--examples-per-row", type=int, default=3, help="examples packed per row (1: one example fills the row)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (measured, off by default)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train.json")
    args = ap.parse_args(argv)
    import torch
    import yaml

    gpu = torch.cuda.is_available()
    names = (args.shapes or ("1.3b,5.8b,12.8b" if gpu else "tiny,small")).split(",")
    known = yaml.safe_load((REPO / "pipeline_config" / "planner" / "planner.yaml").read_text())["shapes"]
    shapes = {n: CPU_SHAPES.get(n) or known[f"EleutherAI/polyglot-ko-{n}"] for n in names}
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
