"""The `data-refresh` flow: crawl univ100 -> crawl CBNU -> generate QA -> load datasets (KULLM-v2, ...) -> feedback data ->
merge-data -> index -> format.

Run as: culbot run data-refresh [--data-profile sample] [--data-set qa.max_in_flight=8] [--force]

Each stage is a cached Prefect task keyed by its inputs' content hashes, its config, its
source code and where its outputs go (flows/runner.py). A rerun with nothing changed is
served from the cache; a cached result whose folder no longer verifies is rebuilt.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from culbot.flows.deployed import check_version
from culbot.flows.params import DataOverrides, DataProfileChoice, DataProfileName, profile_source
from culbot.flows.review import review_feedback
from culbot.flows.runner import RAW_LOCK, exclusive, run_stage
from culbot.pipeline_config.loader import DEFAULT_DATA_PROFILE
from culbot.pipeline_config.schema import DataProfile, load_data_profile
from culbot.tasks import _store
from culbot.tasks import artifact_root as _artifact_root
from culbot.tasks.contracts import DataRefreshResult, StageOutput, short_hash
from culbot.tasks.crawl_cbnu import crawl_cbnu_task
from culbot.tasks.crawl_univ100 import crawl_univ100_task
from culbot.tasks.feedback_data import feedback_data_task, mark_used
from culbot.tasks.format import format_task
from culbot.tasks.generate_qa import generate_qa_task
from culbot.tasks.index import index_task
from culbot.tasks.load_dataset import load_dataset_task
from culbot.tasks.merge_data import merge_data_task


def summary_markdown(profile: str, results: dict[str, StageOutput]) -> str:
    lines = [f"# data-refresh ({profile})", "", "| stage | output | content hash | counts |", "|---|---|---|---|"]
    for name, r in results.items():
        counts = ", ".join(f"{k}={v}" for k, v in r.counts.items() if not isinstance(v, dict))
        lines.append(f"| {name} | `{r.path}` | `{short_hash(r.content_hash)}` | {counts} |")
    return "\n".join(lines) + "\n"


NEW_VERSION_EVENT = "culbot.dataset.new-version"   # what `culbot deploy --run-on-new-data` reacts to


def announce_new_version(profile: DataProfileChoice, dataset: StageOutput) -> None:
    """A Prefect event for a dataset version this refresh made (a cached or rebuilt one it already had is not new).
    It carries the refresh's data parameters, so a run it starts (``culbot deploy --run-on-new-data``) rebuilds the
    same version. Only toward a configured server: a temporary one (`culbot run`) has no automation to react, and its
    events client would only lengthen the run."""
    from prefect.events import emit_event
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        return

    emit_event(event=NEW_VERSION_EVENT, resource={"prefect.resource.id": f"culbot.dataset.{dataset.content_hash}",
                                                  "prefect.resource.name": short_hash(dataset.content_hash),
                                                  "culbot.data-profile": profile.data_profile,
                                                  "culbot.data-profile-file": profile.data_profile_file},
               payload={"path": str(dataset.path), "counts": {k: v for k, v in dataset.counts.items() if isinstance(v, int)},
                        "data_overrides": profile.data_overrides})
    get_run_logger().info("new dataset version %s: event %s", short_hash(dataset.content_hash), NEW_VERSION_EVENT)


# No log_prints: dill (used by datasets) prints bytecode through print(), which would flood the logs.
@flow(name="data-refresh", flow_run_name="data-refresh-{data_profile}")
def data_refresh(data_profile: DataProfileName = DEFAULT_DATA_PROFILE, data_overrides: DataOverrides = {}, force: bool = False,
                 artifact_root: str = "", data_profile_file: str = "") -> DataRefreshResult:
    """Refresh the training data: a new dataset version appears only when the data changed.

    Args:
        data_profile: Data profile shipped in pipeline_config: sample (the shipped samples, no network), sample-mixed
            (plus ShareGPT conversations) or production (univ100, the CBNU site, gpt-3.5-turbo, KULLM-v2 from the Hub).
        data_overrides: Data profile fields to change for this run, field name to value, e.g. {"qa.max_in_flight": 4}
            (`culbot config docs` lists every field).
        force: Ignore every cache and rebuild each stage.
        artifact_root: fsspec URL every host shares, e.g. s3://bucket/culbot (empty: $CULBOT_ARTIFACT_ROOT, else local disk only).
        data_profile_file: A custom data profile, as a YAML path on the worker; replaces data_profile when given.
    """
    check_version()
    dp = load_data_profile(profile_source(data_profile, data_profile_file, "data_profile"), data_overrides)
    review_feedback(dp.feedback)   # a pause for review (feedback.review: pause) holds no lock
    with exclusive(RAW_LOCK):   # two refreshes (a schedule and a full run) never write raw/ at once
        return _refresh(dp, force, artifact_root, DataProfileChoice(data_profile=data_profile, data_profile_file=data_profile_file,
                                                                    data_overrides=data_overrides))


def _refresh(dp: DataProfile, force: bool, artifact_root: str, choice: DataProfileChoice) -> DataRefreshResult:
    stages: dict[str, StageOutput] = {}   # by stage name (each load-dataset by its dataset's too)
    root = _artifact_root.configured(artifact_root)

    def stage(task, suffix: str = "", **inputs) -> StageOutput:
        stages[task.name + suffix] = out = run_stage(task, force=force, root=root, **inputs)
        return out

    sources: dict[str, StageOutput] = {}
    pages = None
    if dp.univ100.enabled:
        sources["univ100"] = stage(crawl_univ100_task, univ100=dp.univ100)
    if dp.cbnu.enabled:
        pages = stage(crawl_cbnu_task, cbnu=dp.cbnu)
        if dp.qa.enabled:
            sources["cbnu"] = stage(generate_qa_task, qa=dp.qa, pages=pages.ref())
    for entry in dp.datasets:
        if entry.enabled:
            sources[entry.name] = stage(load_dataset_task, f"-{entry.name}", entry=entry)
    if dp.feedback.enabled:
        sources["feedback"] = stage(feedback_data_task, feedback=dp.feedback)
    if not sources:
        raise ValueError(f"data profile {dp.name!r}: every source stage is disabled; nothing to merge")
    known = {v["content_hash"] for v in _store.read_jsonl(Path(dp.merge_data.out_root) / "versions.jsonl")}
    dataset = stage(merge_data_task, merge_data=dp.merge_data, inputs={k: v.ref() for k, v in sources.items()})
    if dataset.content_hash not in known:
        announce_new_version(choice, dataset)
    if "feedback" in sources:
        mark_used(dp.feedback, sources["feedback"], dataset)
    index = None
    if dp.rag.enabled and pages is not None:
        index = stage(index_task, rag=dp.rag, pages=pages.ref(), dataset=dataset.ref(), qa=sources["cbnu"].ref() if "cbnu" in sources else None,
                      univ100=sources["univ100"].ref() if "univ100" in sources and dp.rag.include_univ100 else None)
    formatted = stage(format_task, fmt=dp.format, dataset=dataset.ref(), rag=dp.rag, index=index.ref() if index else None)
    create_markdown_artifact(summary_markdown(dp.name, stages), key="data-refresh-summary", description="data-refresh outputs")
    get_run_logger().info("dataset version %s at %s; formatted at %s", short_hash(dataset.content_hash), dataset.path, formatted.path)
    return DataRefreshResult(dataset=dataset, formatted=formatted, index=index, stages=stages)
