"""Two checkouts on one machine share the default Prefect home: each writes, or finds, its outputs in its own folder."""
import os
import subprocess
import sys

import pytest

from culbot.tasks import _store
from tests.conftest import SAMPLES


def _run(work, env):
    r = subprocess.run([sys.executable, "-m", "culbot.flows.cli", "run", "data-refresh"], cwd=work, capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout + r.stderr


@pytest.mark.slow
def test_two_checkouts_sharing_a_prefect_home_get_their_own_outputs(tmp_path):
    env = {"PREFECT_HOME": str(tmp_path / "prefect")}   # one Prefect home, as ~/.prefect is for two clones of one user
    a, b = tmp_path / "a", tmp_path / "b"
    for w in (a, b):
        (w / "raw").mkdir(parents=True)
        os.symlink(SAMPLES, w / "raw" / "samples")
    _run(a, env)
    out_b = _run(b, env)
    assert str(a) not in out_b                        # before the fix: "dataset version …: <a>/artifacts/datasets/…"
    datasets = list((b / "artifacts" / "datasets").glob("*/manifest.json"))
    assert len(datasets) == 1 and _store.is_complete(datasets[0].parent)
    assert f"{b / 'artifacts' / 'datasets'}" in out_b
    again = _run(b, env)                              # each checkout is then served from its own cache
    assert again.count("Finished in state Cached") >= 6 and str(a) not in again
