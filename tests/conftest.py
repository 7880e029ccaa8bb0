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


@pytest.fixture(scope="session")
def sample_formatted(tmp_path_factory) -> Path:
    """The sample data half run through the stage cores (no Prefect): a formatted dataset folder."""
    from culbot.pipeline_config.schema import load_profile
    from culbot.tasks import crawl_cbnu, crawl_univ100, format_prompts, generate_qa, load_kullm, merge_data

    root = tmp_path_factory.mktemp("sample-data")
    raw = root / "raw"
    prof = load_profile("sample", [
        f"univ100.snapshot_dir={SAMPLES / 'univ100'}", f"univ100.out_dir={raw / 'univ100'}",
        f"cbnu.pages_dir={SAMPLES / 'cbnu_pages'}", f"cbnu.out_dir={raw / 'cbnu'}",
        f"qa.replay_dir={SAMPLES / 'qa_replay'}", f"qa.cache_dir={raw / 'cache'}", f"qa.out_dir={raw / 'qa'}",
        f"kullm.file={SAMPLES / 'kullm_sample.jsonl'}", f"kullm.out_dir={raw / 'kullm'}",
        f"merge.out_root={root / 'datasets'}", f"format.out_root={root / 'formatted'}",
    ])
    crawl_univ100.run_crawl(prof.univ100)
    crawl_cbnu.run_crawl(prof.cbnu)
    generate_qa.run_generate(prof.qa, prof.cbnu.out_dir)
    load_kullm.run_load(prof.kullm)
    d = merge_data.run_merge({"univ100": prof.univ100.out_dir, "cbnu": prof.qa.out_dir, "kullm": prof.kullm.out_dir}, prof.merge)
    return Path(format_prompts.run_format(d["path"], prof.format)["path"])


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from culbot.tasks.tiny_model import build_tiny_model, sample_corpus

    out = tmp_path_factory.mktemp("models") / "tiny"
    build_tiny_model(out, sample_corpus(SAMPLES))
    return out
