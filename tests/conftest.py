"""Shared test set-up: offline Hugging Face, an isolated Prefect home, one Prefect harness."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before anything imports prefect or huggingface_hub.
_HOME = tempfile.mkdtemp(prefix="culbot-tests-")
os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HOME": os.path.join(_HOME, "hf"),
    "PREFECT_HOME": os.path.join(_HOME, "prefect"),
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "culbot",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    "DO_NOT_TRACK": "1",
})
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("OPENAI_API_KEY", None)

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "raw" / "samples"


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def fast_http(**kw) -> dict:
    """An HTTP policy for local servers: quick pacing and backoff, same code path."""
    base = {"rate_per_host": 200.0, "max_concurrency_per_host": 4, "timeout_s": 0.8, "max_retries": 3,
            "backoff_base_s": 0.05, "backoff_max_s": 0.2, "retry_after_max_s": 5.0}
    base.update(kw)
    return base
