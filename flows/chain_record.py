"""`culbot run full` with nothing to do: answered from a record of the last identical run, without starting Prefect.

A warm rerun was served entirely from the stage caches, yet took 24 s, most of it starting the temporary Prefect
server. After a completed chain the CLI records its result under a fingerprint of everything the stages' cache keys
are made of: the culbot version (every source, profile, template and prompt), both resolved profiles, the working
folder, the time windows of live crawls and Hub branches (the same functions the flow uses), the content of the local
inputs, the eval questions and the release registry (the eval's baseline). A rerun with the same fingerprint whose
every output folder still verifies against its manifest prints the same summary and stops; anything else (a change,
a missing or altered folder, --force, an artifact root shared with other hosts) runs the flow as before.
"""
from __future__ import annotations

from pathlib import Path

from culbot.pipeline_config.schema import DataProfile
from culbot.pipeline_config.train_schema import TrainProfile
from culbot.tasks import _store
from culbot.tasks.contracts import ChainResult, StageOutput

RECORDS = "chains"   # under the training profile's artifacts_root


def _content(path: Path | str | None) -> str | None:
    """A local input's content: a file's hash, a folder's tree hash; None when absent."""
    if path is None:
        return None
    p = Path(path)
    return _store.sha256_file(p) if p.is_file() else _store.tree_hash(p) if p.is_dir() else None


def fingerprint(dp: DataProfile, tp: TrainProfile, to_stage: str) -> str:
    from culbot.flows.data_refresh import _time_window, cbnu_window, univ100_window
    from culbot.flows.deployed import culbot_version
    from culbot.tasks.load_datasets import source_hash
    from culbot.tasks.releases import registry_path

    return _store.hash_json({
        "version": culbot_version(), "to_stage": to_stage, "home": str(Path.cwd().resolve()),
        "data": dp.model_dump(mode="json"), "train": tp.model_dump(mode="json"),
        "univ100": univ100_window(dp.univ100) if dp.univ100.enabled else None,
        "cbnu": cbnu_window(dp.cbnu) if dp.cbnu.enabled else None,
        "qa_replay": _content(dp.qa.replay_dir) if dp.qa.enabled and dp.qa.backend == "replay" else None,
        "datasets": [source_hash(e, _time_window(24)) for e in dp.datasets if e.enabled],
        "samples": _content(tp.samples_dir), "questions": _content(tp.eval.retrieval_questions),
        "registry": _content(registry_path(tp.publish)),
    })


def outputs(result: ChainResult) -> list[StageOutput]:
    data = result.data
    out = [*data.stages.values(), data.dataset, data.formatted, data.index, result.tokenized, result.run, result.eval, result.model,
           result.publish]
    return [o for o in out if o is not None]


def record_path(tp: TrainProfile, fp: str) -> Path:
    return Path(tp.artifacts_root) / RECORDS / f"{fp[:24]}.json"


def recorded(tp: TrainProfile, fp: str) -> ChainResult | None:
    """The last identical chain's result, if every folder it names is still there and verifies."""
    from pydantic import ValidationError

    p = record_path(tp, fp)
    if not p.is_file():
        return None
    try:
        result = _store.read_model(p, ChainResult)
    except (ValidationError, ValueError, OSError):
        return None
    from culbot.flows.runner import verified

    return result if all(verified(out) for out in outputs(result)) else None


def record(tp: TrainProfile, fp: str, result: ChainResult) -> Path:
    return _store.write_model(record_path(tp, fp), result)
