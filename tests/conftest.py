"""Shared test set-up: offline Hugging Face, an isolated Prefect home, one Prefect harness, and the
expensive inputs every stage test shares (the sample data, the tiny model, one trained run)."""
from __future__ import annotations

import os
import tempfile
import time
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
    "CULBOT_FEEDBACK_DB": f"sqlite:///{os.path.join(_HOME, 'feedback.db')}",   # chat, serve and demo keep answers here
})
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("OPENAI_API_KEY", None)

import pytest  # noqa: E402
import yaml  # noqa: E402

from culbot.tasks import _store  # noqa: E402


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker more than this process may use cores. Many tests wait on subprocesses and servers: on 2
    cores, 3 workers kept the CPUs 170% busy and took 8:14 where 2 took 10:20."""
    return len(os.sched_getaffinity(0)) + 1 if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1) + 1


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


def sample_profile_file(tmp_path: Path, name: str = "flowtest") -> str:
    """A data profile over the shipped samples, every output under ``tmp_path``."""
    raw = tmp_path / "raw"
    data = {
        "name": name,
        "univ100": {"source": "snapshot", "snapshot_dir": str(SAMPLES / "univ100"), "out_dir": str(raw / "univ100")},
        "cbnu": {"source": "directory", "pages_dir": str(SAMPLES / "cbnu_pages"), "out_dir": str(raw / "cbnu")},
        "qa": {"backend": "replay", "replay_dir": str(SAMPLES / "qa_replay"), "chunk_tokens": 400,
               "cache_dir": str(raw / "qa_cache"), "out_dir": str(raw / "cbnu_qa")},
        "datasets": [{"name": "kullm", "file": str(SAMPLES / "kullm_sample.jsonl"), "type": "alpaca", "out_dir": str(raw / "kullm")}],
        "merge_data": {"validation_fraction": 0.1, "out_root": str(tmp_path / "artifacts" / "datasets")},
        "format": {"out_root": str(tmp_path / "artifacts" / "formatted")},
    }
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data, allow_unicode=True))
    return str(p)


def task_states(flow_run_id) -> list[tuple[str, str]]:
    """(task name, state name) of a flow run's task runs, sorted, once every one has a final state."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    # Task-run states reach the API asynchronously: wait until every run has one.
    for _ in range(60):
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        if runs and all(r.state is not None and r.state.is_final() for r in runs):
            break
        time.sleep(0.5)
    return sorted((r.name.rsplit("-", 1)[0], r.state.name if r.state else "None") for r in runs)


def flow_artifacts(flow_run_id) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: str(a.data) for a in arts if a.key}


# ----- QA generation against a local OpenAI-compatible server ---------------------------------

OPENAI_KEY = "sk-test-never-log-me-123"


def facts(tag: str, n: int = 3) -> list[tuple[str, str, str]]:
    return [(f"{tag} 안내 질문 {i}번은 무엇인가요?", "", f"{tag} 안내에 따르면 항목 {i}번은 매주 월요일 오전 9시에 진행됩니다.") for i in range(n)]


def page_for(tag: str, n: int = 3) -> dict:
    text = "\n".join(f"{tag} 안내에 따르면 항목 {i}번은 매주 월요일 오전 9시에 진행됩니다. 문의는 043-261-2114 입니다." for i in range(n))
    return {"url": f"https://www.chungbuk.ac.kr/{tag}", "title": f"{tag} 안내", "text": text, "content_hash": _store.sha256_text(text)}


def write_pages(folder, pages):
    _store.atomic_write_jsonl(folder / "pages.jsonl", pages)
    _store.write_manifest(folder, stage="crawl-cbnu", inputs={}, config={}, counts={})
    return folder


def qa_config(tmp_path, base, **kw):
    """A QA config against a local OpenAI-compatible server: fast retries, outputs under tmp_path."""
    from culbot.pipeline_config.schema import QAGenConfig

    d = dict(backend="openai", base_url=base + "/v1", items_per_chunk=3, max_in_flight=4, requests_per_minute=6000,
             backoff_base_s=0.05, parse_retries=2, max_retries=3, timeout_s=10, cache_dir=tmp_path / "cache", out_dir=tmp_path / "qa")
    d.update(kw)
    return QAGenConfig(**d)


@pytest.fixture(scope="session")
def sample_formatted(tmp_path_factory) -> Path:
    """The sample data half run through the stage cores (no Prefect): a formatted dataset folder."""
    from culbot.pipeline_config.schema import load_data_profile
    from culbot.tasks import crawl_cbnu, crawl_univ100, generate_qa, load_dataset, merge_data
    from culbot.tasks.format import run_format

    root = tmp_path_factory.mktemp("sample-data")
    dp = load_data_profile(sample_profile_file(root))
    crawl_univ100.run_crawl(dp.univ100)
    crawl_cbnu.run_crawl(dp.cbnu)
    generate_qa.run_generate(dp.qa, dp.cbnu.out_dir)
    kullm = load_dataset.run_load_dataset(dp.dataset("kullm"))
    d = merge_data.run_merge({"univ100": dp.univ100.out_dir, "cbnu": dp.qa.out_dir, "kullm": kullm.path}, dp.merge_data)
    return run_format(d.path, dp.format).path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from culbot.tasks.tiny_model import build_tiny_model, sample_corpus

    out = tmp_path_factory.mktemp("models") / "tiny"
    build_tiny_model(out, sample_corpus(SAMPLES))
    return out


def tiny_base(tiny_model: Path):
    from culbot.pipeline_config.train_schema import TINY
    from culbot.tasks.contracts import BaseModelRef

    return BaseModelRef(name=TINY, path=str(tiny_model))


@pytest.fixture(scope="session")
def sample_tokenized(tmp_path_factory, sample_formatted, tiny_model) -> Path:
    """The sample data tokenized with the tiny model's tokenizer, as the cpu-tiny profile does."""
    from culbot.pipeline_config.train_schema import load_train_profile
    from culbot.tasks.tokenize import run_tokenize

    return run_tokenize(sample_formatted, tiny_base(tiny_model), tmp_path_factory.mktemp("tokenized"), load_train_profile("cpu-tiny").tokenize).path


def prepare_tiny_run(root: Path, tokenized: Path, tiny_model: Path, *overrides: str):
    """(profile, config path) of a cpu-tiny run under ``root`` with --train-set style overrides."""
    from culbot.pipeline_config.train_schema import load_train_profile
    from culbot.tasks.train import prepare_run

    prof = load_train_profile("cpu-tiny", list(overrides))
    return prof, prepare_run(prof, tokenized, runs_root=root / "runs", models_root=tiny_model.parent, samples_dir=SAMPLES)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, sample_tokenized, tiny_model) -> Path:
    """One finished cpu-tiny run (8 steps) with a passing eval: what eval, merge-adapter and publish start from."""
    from culbot.pipeline_config.train_schema import EvalConfig
    from culbot.tasks.eval import run_eval
    from culbot.tasks.train import run_training

    prof, cfg = prepare_tiny_run(tmp_path_factory.mktemp("release"), sample_tokenized, tiny_model,
                                 "train.max_steps=8", "train.save_steps=8", "train.eval_steps=8")
    run_training(cfg, prof)
    run_eval(cfg.parent, EvalConfig(probes=["도서관은 몇 시에 여나요?"], max_new_tokens=8, answer_questions=0))
    return cfg.parent


@pytest.fixture(scope="session")
def cbnu_index(tmp_path_factory) -> Path:
    """The retrieval index of the shipped CBNU sample pages (lexical and title keys)."""
    from culbot.pipeline_config.schema import RagConfig
    from culbot.tasks.index import build_index

    return build_index(SAMPLES / "cbnu_pages", RagConfig(), tmp_path_factory.mktemp("index")).path
