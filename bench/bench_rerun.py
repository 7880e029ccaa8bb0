"""Rerun cost: cold vs warm wall time of the smoke chain (`culbot run full` on the embedded default) and their ratio.

Run as: python bench/bench_rerun.py [--flow full|data-refresh] [--out bench/results/rerun.json]

Each run is the README's command in a fresh working folder with its own PREFECT_HOME: the shipped samples,
the tiny model on CPU, a local publish folder, an ephemeral Prefect server. The warm run changes nothing,
so every stage is served from the cache; the figure includes Python and Prefect start-up.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._report import write_results  # noqa: E402


def cold_warm(flow: str, tmp: Path) -> dict:
    work = tmp / "work"
    (work / "raw").mkdir(parents=True)
    os.symlink(REPO / "raw" / "samples", work / "raw" / "samples")
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "culbot.flows.cli", "run", flow], cwd=work, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-2000:])
    return {"flow": flow, "cold_s": round(times[0], 2), "warm_s": round(times[1], 2), "cold_over_warm": round(times[0] / times[1], 2),
            "note": f"wall time of `culbot run {flow}`, including Python start-up and the ephemeral Prefect server"}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flow", choices=["full", "data-refresh"], default="full")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "rerun.json")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="culbot-bench-rerun-"))
    try:
        res = cold_warm(args.flow, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"rerun cost of `culbot run {res['flow']}` (embedded default)")
    print(f"  cold               {res['cold_s']:>8.2f} s")
    print(f"  warm (all cached)  {res['warm_s']:>8.2f} s")
    print(f"  cold / warm        {res['cold_over_warm']:>8.2f}×")
    write_results(args.out, res)
    return res


if __name__ == "__main__":
    main()
