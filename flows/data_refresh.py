"""The `data-refresh` flow: crawl univ100 -> crawl CBNU -> generate QA -> load KULLM -> merge -> format.

Run as: culbot run data-refresh [--profile sample] [--set qa.max_in_flight=8] [--force]

Each stage is a cached Prefect task keyed by its inputs' content hashes, its
config and its source code. A rerun with nothing changed is served from the
cache; a cached result whose folder no longer verifies is rebuilt, never trusted.
"""
from __future__ import annotations

import math
import re
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from culbot.pipeline_config.schema import DataProfile, load_profile
from culbot.tasks import _store
from culbot.tasks import artifact_root as _artifact_root
from culbot.tasks._prefect import output_ok
from culbot.tasks.crawl_cbnu import crawl_cbnu_task
from culbot.tasks.crawl_univ100 import crawl_univ100_task
from culbot.tasks.format_prompts import format_task
from culbot.tasks.generate_qa import generate_qa_task
from culbot.tasks.load_kullm import load_kullm_task
from culbot.tasks.merge_data import merge_task


def _time_window(hours: float) -> str:
    """Cache reuse window for live crawls: the same bucket reuses the last crawl."""
    return f"t{math.floor(time.time() / (hours * 3600))}"


def univ100_window(cfg: DataProfile) -> str:
    u = cfg.univ100
    return "snapshot-" + _store.tree_hash(u.snapshot_dir) if u.source == "snapshot" else _time_window(u.refresh_every_hours)


def cbnu_window(cfg: DataProfile) -> str:
    c = cfg.cbnu
    return "dir-" + _store.tree_hash(c.pages_dir) if c.source == "directory" else _time_window(c.refresh_every_hours)


def kullm_source_hash(cfg: DataProfile) -> str:
    k = cfg.kullm
    if k.source == "file":
        return _store.sha256_file(Path(k.file))
    pinned = re.fullmatch(r"[0-9a-f]{40}", k.revision) is not None
    # A commit sha never changes; a branch such as "main" is re-read once a day.
    return f"{k.hub_id}@{k.revision}" + ("" if pinned else "-" + _time_window(24))


def ref(result: dict) -> dict:
    """What the next stage needs: the folder and its content hash (counts would spoil cache keys)."""
    return {"path": result["path"], "content_hash": result["content_hash"]}


def fetch_cached(result: dict | None, root: str | None) -> bool:
    """A cached result whose folder is not on this host: pull it from the artifact root if it is there."""
    if not root or not result or "path" not in result:
        return False
    try:
        if "run_dir" in result:
            _artifact_root.pull_run(Path(result["run_dir"]), root)
        else:
            _artifact_root.pull(Path(result["path"]), root)
    except (_artifact_root.TransferError, FileNotFoundError) as e:
        get_run_logger().info("not in the artifact root (%s); rebuilding", e)
        return False
    return output_ok(result)


def run_stage(task, force: bool, root: str | None = None, **kwargs) -> dict:
    """Run a stage task; rebuild if its cached output is missing or no longer matches its manifest.

    With an artifact root, a cached output made on another host is pulled rather than rebuilt.
    """
    result = (task.with_options(refresh_cache=True) if force else task)(**kwargs)
    if not output_ok(result) and not fetch_cached(result, root):
        get_run_logger().warning("%s: cached output %s is missing or changed; rebuilding it", task.name, (result or {}).get("path"))
        result = task.with_options(refresh_cache=True)(**kwargs)
        if not output_ok(result):
            raise RuntimeError(f"{task.name}: output {result.get('path')} does not verify against its manifest")
    return result


def summary_markdown(profile: str, results: dict[str, dict]) -> str:
    lines = [f"# data-refresh ({profile})", "", "| stage | output | content hash | counts |", "|---|---|---|---|"]
    for name, r in results.items():
        counts = ", ".join(f"{k}={v}" for k, v in r["counts"].items() if not isinstance(v, dict))
        lines.append(f"| {name} | `{r['path']}` | `{r['content_hash'][:12]}` | {counts} |")
    return "\n".join(lines) + "\n"


# No log_prints: dill (used by datasets) prints bytecode through print(), which would flood the logs.
@flow(name="data-refresh", flow_run_name="data-refresh-{profile}")
def data_refresh(profile: str = "sample", overrides: list[str] | None = None, force: bool = False,
                 artifact_root: str | None = None) -> dict:
    """Refresh the training data.

    Args:
        profile: data profile, a name in pipeline_config/ (sample, production) or a YAML path.
        overrides: `section.field=value` settings applied on top of the profile.
        force: ignore every cache and rebuild each stage.
        artifact_root: fsspec URL shared by all hosts (default $CULBOT_ARTIFACT_ROOT; unset: local disk only).
    """
    root = _artifact_root.configured(artifact_root)
    cfg = load_profile(profile, overrides or [])
    log = get_run_logger()
    results: dict[str, dict] = {}
    sources: dict[str, dict] = {}
    if cfg.univ100.enabled:
        results["crawl-univ100"] = sources["univ100"] = run_stage(
            crawl_univ100_task, force, config=cfg.univ100.model_dump(mode="json"), window=univ100_window(cfg))
    if cfg.cbnu.enabled:
        results["crawl-cbnu"] = pages = run_stage(crawl_cbnu_task, force, config=cfg.cbnu.model_dump(mode="json"), window=cbnu_window(cfg))
        if cfg.qa.enabled:
            results["generate-qa"] = sources["cbnu"] = run_stage(generate_qa_task, force, config=cfg.qa.model_dump(mode="json"), pages=ref(pages))
    if cfg.kullm.enabled:
        results["load-kullm"] = sources["kullm"] = run_stage(
            load_kullm_task, force, config=cfg.kullm.model_dump(mode="json"), source_hash=kullm_source_hash(cfg))
    if not sources:
        raise ValueError(f"profile {cfg.name!r}: every source stage is disabled; nothing to merge")
    inputs = {k: ref(v) for k, v in sources.items()}
    results["merge"] = dataset = run_stage(merge_task, force, root, config=cfg.merge.model_dump(mode="json"), inputs=inputs)
    results["format"] = formatted = run_stage(
        format_task, force, root, config=cfg.format.model_dump(mode="json"), dataset=ref(dataset))
    if root:  # the dataset version and its formatted form, for the training hosts
        for out in (dataset, formatted):
            _artifact_root.push(Path(out["path"]), root)
        log.info("dataset %s and formatted data pushed to %s", dataset["content_hash"][:12], root)
    create_markdown_artifact(summary_markdown(cfg.name, results), key="data-refresh-summary", description="data-refresh outputs")
    log.info("dataset version %s at %s; formatted at %s", dataset["content_hash"][:16], dataset["path"], formatted["path"])
    return {"dataset": dataset, "formatted": formatted, "stages": results}
