"""Restartability: SIGKILL the whole `culbot run full` process group mid-training, rerun, and check what was reused."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

TRAIN = ["--train-set", "train.max_steps=60", "--train-set", "train.save_steps=5", "--train-set", "train.logging_steps=5",
         "--train-set", "train.eval_steps=1000", "--train-set", "eval.max_new_tokens=4"]


@pytest.mark.slow
def test_sigkill_during_training_then_rerun_resumes(tmp_path):
    work = tmp_path / "work"
    (work / "raw").mkdir(parents=True)
    os.symlink(REPO / "raw" / "samples", work / "raw" / "samples")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    cmd = [sys.executable, "-m", "culbot.flows.cli", "run", "full", *TRAIN]
    first = subprocess.Popen(cmd, cwd=work, env=env, stdout=open(tmp_path / "first.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 400
    try:
        while not list((work / "artifacts" / "runs").glob("*/checkpoints/checkpoint-*/culbot_complete.json")):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.5)
    finally:
        os.killpg(first.pid, signal.SIGKILL)   # the flow, its ephemeral server and the trainer, as a crash would
        first.wait()
    assert not list((work / "artifacts" / "runs").glob("*/train_result.json"))

    second = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert out.count("Finished in state Cached") >= 7          # crawl x2, generate-qa, load-dataset, merge-data, format, tokenize
    assert "resuming from checkpoint-" in out and "starting from step 0" not in out
    assert "published merged:" in out

    # Nothing changed: answered from the chain's record without starting Prefect, with the same summary.
    t0 = time.monotonic()
    third = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    took = time.monotonic() - t0
    assert third.returncode == 0 and "nothing to do: the last run with this code" in third.stdout, third.stdout + third.stderr[-3000:]
    assert "Finished in state" not in third.stdout + third.stderr and "published merged:" in third.stdout
    print(f"warm rerun answered from its record in {took:.1f} s")
    # A missing output is not trusted: the flow runs again and rebuilds it.
    import shutil

    merged = work / next(line.split(": ", 1)[1] for line in second.stdout.splitlines() if line.startswith("merged model: "))
    shutil.rmtree(merged)
    fourth = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert fourth.returncode == 0 and "nothing to do" not in fourth.stdout and (merged / "manifest.json").is_file(), fourth.stderr[-3000:]
