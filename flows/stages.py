"""Single-stage flows, so any stage can be rerun from the Prefect UI against an existing dataset version or run.

Deployed from deploy/prefect.yaml: train on each GPU pool, and eval, merge and publish on the cpu pool.
Each one takes paths (a formatted dataset, a run folder, a merged model) and a training profile.
With an artifact root, a folder this host does not have is pulled from it first, and what
the stage makes is pushed back, so hosts that share no disk can hand off.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow

from culbot.flows.data_refresh import run_stage
from culbot.pipeline_config.train_schema import load_train_profile
from culbot.tasks import _store
from culbot.tasks import artifact_root as _artifact_root
from culbot.tasks.release_tasks import eval_task, merge_adapter_task, publish_task, train_task


def _ref(path: str, root: str | None = None) -> dict:
    if root and _store.read_manifest(Path(path)) is None:
        _artifact_root.pull(Path(path), root)
    m = _store.read_manifest(Path(path))
    if m is None:
        raise FileNotFoundError(f"{path}: not a finished stage output (no manifest.json)" + ("" if root else "; set artifact_root if it was made on another host"))
    return {"path": str(Path(path).resolve()), "content_hash": m["content_hash"]}


def _run_ref(run_dir: str, root: str | None = None) -> dict:
    if root and _store.read_manifest(Path(run_dir) / "adapter") is None:
        _artifact_root.pull_run(Path(run_dir), root)
    return {**_ref(str(Path(run_dir) / "adapter")), "run_dir": str(Path(run_dir).resolve())}


def _setup(artifact_root: str | None, train_profile: str, train_overrides: list[str] | None):
    """Every stage flow starts the same way: the artifact root in effect and the resolved training profile."""
    return _artifact_root.configured(artifact_root), load_train_profile(train_profile, train_overrides or [])


def _train_run_name() -> str:
    """train-<profile>-<dataset hash prefix>: what ran, on what data."""
    from prefect.runtime import flow_run

    p = flow_run.parameters
    fm = _store.read_manifest(Path(p["formatted"]))
    data = fm["inputs"]["dataset"] if fm and "dataset" in fm.get("inputs", {}) else Path(p["formatted"]).name
    return f"train-{Path(p.get('train_profile', 'cpu-tiny')).stem}-{data[:8]}"


# persist_result: the parent `culbot` run reads this result, possibly from another host's result storage.
@flow(name="train-stage", flow_run_name=_train_run_name, persist_result=True)
def train_stage(formatted: str, train_profile: str = "cpu-tiny", train_overrides: list[str] | None = None, force: bool = False,
                artifact_root: str | None = None) -> dict:
    """Train an adapter on a formatted dataset folder (artifacts/formatted/<hash>)."""
    root, tp = _setup(artifact_root, train_profile, train_overrides)
    run = run_stage(train_task, force, root, profile=tp.model_dump(mode="json"), formatted=_ref(formatted, root))
    if root:
        _artifact_root.push_run(Path(run["run_dir"]), root)
    return run


@flow(name="eval-stage", flow_run_name="eval-{train_profile}")
def eval_stage(run_dir: str, train_profile: str = "cpu-tiny", train_overrides: list[str] | None = None, force: bool = False,
               artifact_root: str | None = None) -> dict:
    """Evaluate a finished run folder (artifacts/runs/<run>)."""
    root, tp = _setup(artifact_root, train_profile, train_overrides)
    ev = run_stage(eval_task, force, root, run=_run_ref(run_dir, root), spec=tp.eval.model_dump(mode="json"))
    if root:
        _artifact_root.push_run(Path(run_dir), root)
    return ev


@flow(name="merge-stage", flow_run_name="merge-{train_profile}")
def merge_stage(run_dir: str, train_profile: str = "cpu-tiny", train_overrides: list[str] | None = None, force: bool = False,
                artifact_root: str | None = None) -> dict:
    """Merge a run's adapter into its base model."""
    root, tp = _setup(artifact_root, train_profile, train_overrides)
    model = run_stage(merge_adapter_task, force, root, run=_run_ref(run_dir, root), spec=tp.merge.model_dump(mode="json"),
                      models_root=str(Path(tp.artifacts_root).resolve() / "models"), probes=tp.eval.probes)
    if root:
        _artifact_root.push(Path(model["path"]), root)
    return model


@flow(name="publish-stage", flow_run_name="publish-{train_profile}")
def publish_stage(run_dir: str, model_dir: str | None = None, train_profile: str = "cpu-tiny", train_overrides: list[str] | None = None,
                  force: bool = False, artifact_root: str | None = None) -> dict:
    """Publish a run (and its merged model) to the configured target; refused unless guards and eval passed."""
    root, tp = _setup(artifact_root, train_profile, train_overrides)
    run = _run_ref(run_dir, root)
    return run_stage(publish_task, force, root, run=run, model=_ref(model_dir, root) if model_dir else None,
                     spec=tp.publish.model_dump(mode="json"), evaluation=_ref(str(Path(run_dir) / "eval")))
