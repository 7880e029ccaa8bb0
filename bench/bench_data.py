"""Data-half benchmarks: crawl and generation throughput against local servers, data-refresh cold vs warm (bench_rerun.py).

Run as: python bench/bench_data.py [--questions 200] [--chunks 48] [--latency 1.0] [--out bench/results/data.json]

Every server is real HTTP on 127.0.0.1 (the test servers); nothing leaves the machine.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._report import write_results  # noqa: E402

from bench.bench_rerun import cold_warm  # noqa: E402
from tests.servers.base import serve  # noqa: E402
from tests.servers.openai_api import OpenAIApp, OpenAIHandler, Reply, items_json  # noqa: E402
from tests.servers.univ100 import Univ100App, Univ100Handler, make_questions  # noqa: E402


def bench_univ100(n: int, rate: float, tmp: Path) -> dict:
    from culbot.pipeline_config.schema import Univ100Config
    from culbot.tasks.crawl_univ100 import run_crawl

    qs, ans = make_questions(n)
    app = Univ100App(questions=qs, answers=ans)
    with serve(Univ100Handler, app) as base:
        cfg = Univ100Config(source="api", base_url=base, out_dir=tmp / "u",
                            http={"rate_per_host": rate, "max_concurrency_per_host": 4, "backoff_base_s": 0.05})
        t0 = time.perf_counter()
        m = run_crawl(cfg)
        cold = time.perf_counter() - t0
        requests = sum(app.hits.values())
        app.hits.clear()
        t0 = time.perf_counter()
        m2 = run_crawl(cfg)
        warm = time.perf_counter() - t0
    return {"questions": m.counts["records"], "rate_limit_rps": rate, "requests": requests, "seconds": round(cold, 2),
            "requests_per_s": round(requests / cold, 2), "questions_per_s": round(n / cold, 2),
            "incremental_rerun_s": round(warm, 2), "incremental_rerun_requests": sum(app.hits.values()), "new_on_rerun": m2.counts["new"]}


def bench_generation(chunks: int, latency: float, in_flight: int, rpm: float, tmp: Path) -> dict:
    from culbot.pipeline_config.schema import QAGenConfig
    from culbot.tasks import _store
    from culbot.tasks.generate_qa import run_generate

    pages = []
    script = {}
    for i in range(chunks):
        tag = f"문서{i:03d}"
        text = f"{tag} 안내: 충북대학교 {tag} 업무는 평일 오전 9시부터 오후 6시까지 처리합니다."
        pages.append({"url": f"https://x/{i}", "title": tag, "text": text, "content_hash": _store.sha256_text(text)})
        script[tag] = [Reply(content=items_json([(f"{tag} 업무 시간은?", "", f"충북대학교 {tag} 업무는 평일 오전 9시부터 오후 6시까지 처리합니다.")]))]
    folder = tmp / "pages"
    _store.atomic_write_jsonl(folder / "pages.jsonl", pages)
    _store.write_manifest(folder, stage="crawl-cbnu", inputs={}, config={}, counts={})
    app = OpenAIApp(script=script, latency_s=latency)
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench-local")
    with serve(OpenAIHandler, app) as base:
        cfg = QAGenConfig(backend="openai", base_url=base + "/v1", max_in_flight=in_flight, requests_per_minute=rpm,
                          cache_dir=tmp / "cache", out_dir=tmp / "qa", max_cost_usd=None)
        t_start = t0 = time.perf_counter()
        m = run_generate(cfg, folder)
        cold = time.perf_counter() - t0
        reqs = app.requests
        t0 = time.perf_counter()
        run_generate(cfg, folder)
        warm = time.perf_counter() - t0
    bound = min(in_flight / latency, rpm / 60.0)
    # where the time goes: before the first request reaches the server, between the first and the last request (the
    # requests themselves, paced), and after the last one was sent (its answer, then validating and writing)
    first, last = app.arrivals[0] - t_start, app.arrivals[reqs - 1] - t_start
    return {"chunks": chunks, "latency_s": latency, "max_in_flight": in_flight, "requests_per_minute": rpm,
            "requests": reqs, "seconds": round(cold, 2), "achieved_rps": round(reqs / cold, 2), "bound_rps": round(bound, 2),
            "efficiency": round(reqs / cold / bound, 3), "ideal_s": round(reqs / bound, 2),
            "startup_s": round(first, 3), "sending_s": round(last - first, 3), "after_last_request_s": round(cold - last, 3),
            "rows": m.counts["rows"],
            "cached_rerun_s": round(warm, 2), "cached_rerun_requests": app.requests - reqs, "max_in_flight_seen": app.max_in_flight}


def bench_budget_stop(chunks: int, max_requests: int, rpm: float, tmp: Path) -> dict:
    """A queue of ``chunks`` chunks against a request budget: how long from the budget's hit to the run's exit."""
    from culbot.pipeline_config.schema import QAGenConfig
    from culbot.tasks import _store
    from culbot.tasks.generate_qa import run_generate
    from culbot.tasks.llm_client import BudgetExceeded, LLMClient

    pages = [{"url": f"https://x/{i}", "title": f"문서{i:05d}", "text": f"문서{i:05d} 안내: 충북대학교 업무는 평일 오전 9시부터 처리합니다.",
              "content_hash": str(i)} for i in range(chunks)]
    folder = tmp / "budget-pages"
    _store.atomic_write_jsonl(folder / "pages.jsonl", pages)
    _store.write_manifest(folder, stage="crawl-cbnu", inputs={}, config={}, counts={})
    hit: list[float] = []
    stop = LLMClient.stop

    def timed_stop(self, reason):
        hit.append(time.perf_counter()) if not hit else None
        stop(self, reason)

    app = OpenAIApp(script={})
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench-local")
    LLMClient.stop = timed_stop
    try:
        with serve(OpenAIHandler, app) as base:
            cfg = QAGenConfig(backend="openai", base_url=base + "/v1", max_requests=max_requests, requests_per_minute=rpm,
                              cache_dir=tmp / "budget-cache", out_dir=tmp / "budget-qa", max_cost_usd=None)
            t0 = time.perf_counter()
            try:
                run_generate(cfg, folder)
            except BudgetExceeded:
                pass
            end = time.perf_counter()
    finally:
        LLMClient.stop = stop
    return {"chunks": chunks, "max_requests": max_requests, "requests_per_minute": rpm, "requests_sent": app.requests,
            "seconds_to_budget_hit": round(hit[0] - t0, 2), "budget_hit_to_exit_s": round(end - hit[0], 3),
            "old_estimate_s": round((chunks - max_requests) * 60.0 / rpm),
            "note": "before the fix every pending chunk waited its rate-limit turn before failing: about (chunks - max_requests) turns"}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--rate", type=float, default=20.0, help="univ100 requests/s for the throughput run (production default is 1)")
    ap.add_argument("--chunks", type=int, default=48)
    ap.add_argument("--latency", type=float, default=1.0)
    ap.add_argument("--in-flight", type=int, default=8)
    ap.add_argument("--rpm", type=float, default=600)
    ap.add_argument("--budget-chunks", type=int, default=5000, help="queue length for the budget-stop measurement")
    ap.add_argument("--no-refresh", action="store_true", help="skip the data-refresh cold/warm run (bench_rerun.py measures it too)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "data.json")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="culbot-bench-"))
    try:
        res = {"univ100_crawl": bench_univ100(args.questions, args.rate, tmp),
               "qa_generation": bench_generation(args.chunks, args.latency, args.in_flight, args.rpm, tmp),
               "qa_budget_stop": bench_budget_stop(args.budget_chunks, 5, 60.0, tmp)}
        if not args.no_refresh:
            res["data_refresh"] = cold_warm("data-refresh", tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for section, vals in res.items():
        print(f"\n{section}")
        for k, v in vals.items():
            print(f"  {k:<28} {v}")
    write_results(args.out, res)
    return res


if __name__ == "__main__":
    main()
