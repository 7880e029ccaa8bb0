"""Chat latency: time to the first token and tokens per second, in process and through `culbot serve`.

Run as: python bench/bench_chat.py --model artifacts/models/<hash> --index artifacts/indexes/<hash> [--questions 20]
        [--max-new-tokens 64] [--clients 4] [--out bench/results/chat.json]

(`culbot run full` prints both folders.) Three figures:
- answer: the product path (retrieve, render, generate, cut), per question: first token and total seconds, tokens/s.
  A model that ends its answers early (the tiny model emits EOS almost at once) shows little decoding here, so
- decode: the same prompts generated to exactly --max-new-tokens (EOS ignored): the model's decoding rate;
- API: the questions through the OpenAI client against `culbot serve` (streamed), --clients at once: first-token
  latency as a client sees it, requests per second, and how many got 503 (queue bound --max-queue).
"""
from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._report import write_results  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4) if xs else float("nan")


def questions(n: int) -> list[str]:
    from culbot.tasks import _store

    rows = [r["question"] for r in _store.read_jsonl(REPO / "raw" / "samples" / "rag_questions.jsonl") if r.get("gold")]
    return (rows * (n // len(rows) + 1))[:n]


def bench_answer(answerer, qs: list[str]) -> dict:
    first, total, tokens, refused, empty = [], [], 0, 0, 0
    for q in qs:
        r = answerer.answer(q)
        if r.refused or r.empty:   # no generated text to time (refused below the threshold, or EOS at once)
            refused += r.refused
            empty += r.empty
            continue
        first.append(r.first_token_s or r.seconds or 0.0)
        total.append(r.seconds or 0.0)
        tokens += r.tokens
    return {"questions": len(qs), "refused": refused, "empty": empty, "first_token_s_p50": pct(first, 0.5), "first_token_s_p95": pct(first, 0.95),
            "seconds_p50": pct(total, 0.5), "tokens": tokens, "tokens_per_s": round(tokens / sum(total), 1) if sum(total) else None}


def bench_decode(answerer, qs: list[str], max_new: int) -> dict:
    import torch

    model, tok = answerer.generator.model, answerer.tokenizer
    rates, prefill = [], []
    for q in qs:
        r = answerer.reply(q)
        if r.refused:
            continue
        enc = tok(r.prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        base = model.disable_adapter() if getattr(answerer.generator, "without_adapter", False) else contextlib.nullcontext()
        with torch.no_grad(), base:
            t0 = time.perf_counter()
            model(**enc)
            prefill.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = model.generate(**enc, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
            dt = time.perf_counter() - t0
        rates.append((out.shape[1] - enc["input_ids"].shape[1]) / dt)
    return {"prompts": len(rates), "new_tokens": max_new, "prefill_s_p50": pct(prefill, 0.5),
            "tokens_per_s_p50": round(statistics.median(rates), 1) if rates else None}


def bench_api(answerer, qs: list[str], clients: int, max_queue: int) -> dict:
    import httpx
    import openai
    import uvicorn

    from culbot.tasks.serve_api import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(answerer, max_queue=max_queue), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    name = answerer.info().id

    def one(q: str):
        t0 = time.perf_counter()
        first = None
        try:
            for ch in client.chat.completions.create(model=name, messages=[{"role": "user", "content": q}], stream=True):
                if first is None and ch.choices and ch.choices[0].delta.content:
                    first = time.perf_counter() - t0
        except openai.APIStatusError as e:
            return ("busy" if e.status_code == 503 else "error"), None, time.perf_counter() - t0
        return "ok", first if first is not None else time.perf_counter() - t0, time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        res = list(pool.map(one, qs))
    wall = time.perf_counter() - t0
    httpx.get(f"http://127.0.0.1:{port}/health")
    server.should_exit = True
    ok = [r for r in res if r[0] == "ok"]
    return {"requests": len(qs), "clients": clients, "max_queue": max_queue, "ok": len(ok), "busy_503": sum(r[0] == "busy" for r in res),
            "first_token_s_p50": pct([r[1] for r in ok], 0.5), "first_token_s_p95": pct([r[1] for r in ok], 0.95),
            "requests_per_s": round(len(ok) / wall, 2)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--index", type=Path)
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-queue", type=int, default=8)
    ap.add_argument("--base-model", action="store_true", help="With an adapter folder: answer with the adapter switched off (the base "
                    "model, same prompts), e.g. when the trained tiny model ends every answer at once.")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "chat.json")
    a = ap.parse_args(argv)

    from culbot.tasks.answer import Answerer

    t0 = time.perf_counter()
    answerer = Answerer.load(a.model, a.index, max_new_tokens=a.max_new_tokens)
    load_s = round(time.perf_counter() - t0, 2)
    if a.base_model:
        answerer = answerer.base_model()
    qs = questions(a.questions)
    answerer.answer(qs[0])   # warm-up: first call pays for lazy initialisation
    res = {"model": str(a.model), "base_model": a.base_model, "index": str(a.index) if a.index else None, "load_s": load_s,
           "answer": bench_answer(answerer, qs), "decode": bench_decode(answerer, qs[: max(3, a.questions // 4)], a.max_new_tokens),
           "api": bench_api(answerer, qs, a.clients, a.max_queue)}
    an, de, api = res["answer"], res["decode"], res["api"]
    print(f"\n| path | first token p50 / p95 | tokens/s | other |\n|---|---:|---:|---|\n"
          f"| answer (product path, {an['questions']} questions, {an['refused']} refused, {an['empty']} empty) | {an['first_token_s_p50']} / {an['first_token_s_p95']} s | "
          f"{an['tokens_per_s']} | {an['tokens']} tokens in all |\n"
          f"| decode to {de['new_tokens']} tokens ({de['prompts']} prompts) | prefill {de['prefill_s_p50']} s | {de['tokens_per_s_p50']} | |\n"
          f"| API, {api['clients']} streaming clients | {api['first_token_s_p50']} / {api['first_token_s_p95']} s | | "
          f"{api['requests_per_s']} requests/s, {api['ok']} ok, {api['busy_503']} × 503 |")
    write_results(a.out, res)
    return res


if __name__ == "__main__":
    main()
