"""Chat latency: time to the first token and tokens per second, in process and through `culbot serve`.

Run as: python bench/bench_chat.py --model artifacts/models/<hash> --index artifacts/indexes/<hash> [--questions 20]
        [--max-new-tokens 64] [--clients 4] [--load 1,4,16,64] [--out bench/results/chat.json]

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    port = free_port()
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


def _proc_status(pid: int) -> dict[str, int]:
    """Peak resident memory (VmHWM, KiB) and threads of a process, from Linux's /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"peak_rss_kib": int(fields["VmHWM"].split()[0]), "threads": int(fields["Threads"])}


def hostile_requests(name: str) -> list[tuple[str, dict | bytes]]:
    """What a hostile or careless client sends: each must be refused at once, never queued."""
    return [("body 300 KB", {"model": name, "messages": [{"role": "user", "content": "hi"}], "padding": "x" * 300_000}),
            ("question 50k characters", {"model": name, "messages": [{"role": "user", "content": "가" * 50_000}]}),
            ("bad JSON", b'{"model": "x", "messages": [}'),
            ("n=4", {"model": name, "messages": [{"role": "user", "content": "hi"}], "n": 4})]


def bench_load(model: Path, index: Path | None, levels: list[int], per_client: int, max_new_tokens: int, max_queue: int) -> list[dict]:
    """`culbot serve` in its own process under N streaming clients each (normal, long and hostile requests): time to
    the first token, completed requests/s, 503s and errors, /health's worst latency meanwhile, the server's peak
    memory, and its threads and slots after each level (none may be left behind)."""
    import asyncio
    import subprocess

    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "culbot.flows.cli", "serve", "--model", str(model), "--port", str(port), "--max-queue", str(max_queue),
           "--max-new-tokens", str(max_new_tokens), *(["--index", str(index)] if index else [])]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        qs = questions(20)
        long_q = ("생활관 입사 규정에 관해 자세히 묻습니다. " * 150)[:3900] + " 기숙사 신청은 언제 해요?"
        hostile = hostile_requests(name)
        idle = _proc_status(server.pid)
        out = []
        for clients in levels:
            async def run_level() -> dict:
                stats = {"ok": 0, "busy": 0, "refused_4xx": 0, "errors": 0, "first": [], "health_worst_s": 0.0}
                stop = asyncio.Event()
                async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=clients + 8)) as http:
                    async def health():
                        while not stop.is_set():
                            t = time.perf_counter()
                            try:
                                (await http.get("/health", timeout=5)).raise_for_status()
                                stats["health_worst_s"] = max(stats["health_worst_s"], time.perf_counter() - t)
                            except httpx.HTTPError:
                                stats["health_worst_s"] = float("inf")
                            await asyncio.sleep(0.2)

                    async def client(c: int):
                        for i in range(per_client):
                            kind = (c + i) % 4   # 0, 1: normal; 2: long; 3: hostile
                            if kind == 3:
                                what, body = hostile[(c + i) % len(hostile)]
                                r = await http.post("/v1/chat/completions", **({"content": body, "headers": {"content-type": "application/json"}}
                                                                             if isinstance(body, bytes) else {"json": body}))
                                stats["refused_4xx" if 400 <= r.status_code < 500 else "errors"] += 1
                                continue
                            q = long_q if kind == 2 else qs[(c * per_client + i) % len(qs)]
                            t0 = time.perf_counter()
                            async with http.stream("POST", "/v1/chat/completions", json={"model": name, "stream": True,
                                                   "messages": [{"role": "user", "content": q}]}) as r:
                                if r.status_code == 503:
                                    stats["busy"] += 1
                                    continue
                                if r.status_code != 200:
                                    stats["errors"] += 1
                                    continue
                                first = None
                                async for line in r.aiter_lines():
                                    if first is None and '"content":' in line and '"content": ""' not in line:
                                        first = time.perf_counter() - t0
                                    if '"error"' in line[:20]:
                                        stats["errors"] += 1
                                stats["ok"] += 1
                                stats["first"].append(first if first is not None else time.perf_counter() - t0)
                    watcher = asyncio.create_task(health())
                    t0 = time.perf_counter()
                    await asyncio.gather(*(client(c) for c in range(clients)))
                    stats["wall_s"] = time.perf_counter() - t0
                    stop.set()
                    await watcher
                return stats

            st = asyncio.run(run_level())
            time.sleep(12.0)   # anyio's idle worker threads exit after 10 s: what is left after that was leaked
            after, health = _proc_status(server.pid), httpx.get(f"{url}/health").json()
            inside = health["requests_inside"]
            out.append({"clients": clients, "requests": clients * per_client, "ok": st["ok"], "busy_503": st["busy"],
                        "refused_4xx": st["refused_4xx"], "errors": st["errors"],
                        "first_token_s_p50": pct(st["first"], 0.5), "first_token_s_p95": pct(st["first"], 0.95),
                        "completed_per_s": round(st["ok"] / st["wall_s"], 2), "health_worst_s": round(st["health_worst_s"], 3),
                        "peak_rss_mib": round(after["peak_rss_kib"] / 1024, 1), "threads_idle_before": idle["threads"],
                        "threads_after": after["threads"], "slots_held_after": inside, "generations_running_after": health["generations_running"]})
            print(f"load {clients:>3} clients: {out[-1]}", flush=True)
        return out
    finally:
        server.terminate()
        server.wait(30)


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
    ap.add_argument("--load", default="", help="Also load `culbot serve` in its own process with this many streaming clients "
                    "per level, e.g. 1,4,16,64 (a mix of normal, long and hostile requests).")
    ap.add_argument("--load-requests", type=int, default=4, help="Requests per client at each --load level.")
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
    if a.load:
        res["load"] = bench_load(a.model, a.index, [int(x) for x in a.load.split(",")], a.load_requests, a.max_new_tokens, a.max_queue)
        print("\n| clients | requests | ok | 503 | refused 4xx | errors | first token p50 / p95 | completed/s | /health worst | "
              "server peak RSS | threads before → after | slots held / generations running after |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for x in res["load"]:
            print(f"| {x['clients']} | {x['requests']} | {x['ok']} | {x['busy_503']} | {x['refused_4xx']} | {x['errors']} | "
                  f"{x['first_token_s_p50']} / {x['first_token_s_p95']} s | {x['completed_per_s']} | {x['health_worst_s']} s | "
                  f"{x['peak_rss_mib']} MiB | {x['threads_idle_before']} → {x['threads_after']} | {x['slots_held_after']} / {x['generations_running_after']} |")
    write_results(a.out, res)
    return res


if __name__ == "__main__":
    main()
