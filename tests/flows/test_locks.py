"""The global concurrency locks of `culbot deploy` across crashes: a slot whose holder was killed (kill -9) is released by
the next run, which says what it waits for while it waits (issue 22: the next data refresh waited 678 s in silence until
the slot was released by hand)."""
import os
import signal
import subprocess
import sys
import time

import pytest

HOLDER = """
import sys, time
from pathlib import Path
from prefect import flow
from culbot.flows.runner import RAW_LOCK, exclusive

@flow(name="lock-holder")
def hold(marker: str):
    with exclusive(RAW_LOCK):
        Path(marker).write_text("held")
        time.sleep(900)

if __name__ == "__main__":
    from culbot.flows.deploy import ensure_locks
    ensure_locks(log=lambda *_: None)
    hold(sys.argv[1])
"""

WAITER = """
import time
from prefect import flow
from culbot.flows.runner import RAW_LOCK, exclusive

@flow(name="lock-waiter")
def wait_for_it() -> float:
    t0 = time.monotonic()
    with exclusive(RAW_LOCK):
        return time.monotonic() - t0

if __name__ == "__main__":
    print(f"acquired after {wait_for_it():.0f} s")
"""


@pytest.mark.slow
def test_a_slot_whose_holder_was_killed_is_released_by_the_next_run(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_LOGGING_LEVEL": "INFO", "CULBOT_LOCK_CHECK_S": "3"}
    env.pop("PREFECT_API_URL", None)
    (tmp_path / "holder.py").write_text(HOLDER)
    (tmp_path / "waiter.py").write_text(WAITER)
    marker = tmp_path / "held"
    holder = subprocess.Popen([sys.executable, str(tmp_path / "holder.py"), str(marker)], env=env, cwd=tmp_path, start_new_session=True,
                              stdout=open(tmp_path / "holder.log", "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert holder.poll() is None and time.monotonic() < deadline, (tmp_path / "holder.log").read_text()[-3000:]
            time.sleep(0.5)
        waiter = subprocess.Popen([sys.executable, str(tmp_path / "waiter.py")], env=env, cwd=tmp_path,
                                  stdout=open(tmp_path / "waiter.log", "w"), stderr=subprocess.STDOUT)
        # while the holder lives, the waiter says what it waits for, and for how long
        while f"waiting for culbot-raw, held by process {holder.pid} on " not in (tmp_path / "waiter.log").read_text():
            assert waiter.poll() is None and time.monotonic() < deadline + 120, (tmp_path / "waiter.log").read_text()[-3000:]
            time.sleep(0.5)
        os.kill(holder.pid, signal.SIGKILL)   # the flow process only, as `kill -9 <pid of culbot run>` does
        holder.wait()
        assert waiter.wait(timeout=120) == 0
    finally:
        for p in (holder, locals().get("waiter")):
            if p is not None and p.poll() is None:
                p.kill()
        try:
            os.killpg(holder.pid, signal.SIGKILL)   # its temporary server, if it outlived it
        except ProcessLookupError:
            pass
    out = (tmp_path / "waiter.log").read_text()
    assert "acquired after" in out, out[-3000:]
    assert f"released culbot-raw: its holder, process {holder.pid} on " in out and "is gone" in out, out[-3000:]
