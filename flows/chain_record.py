"""`culbot run full` with nothing to do: answered from a record of the last identical run, without starting Prefect.

A warm rerun was served entirely from the stage caches, yet took 24 s, most of it starting the temporary Prefect
server. After a completed chain the CLI records its result under a fingerprint of the culbot version (every source,
profile, template and prompt), both resolved profiles and the working folder, together with every key part the
stages declared while it ran (each stage module's ``cache_key``: the time windows of live crawls and Hub branches,
the content of local inputs, the eval questions, the baseline release; ``tasks/_prefect.py``). A rerun with the
same fingerprint, whose every declared key part is unchanged when its function is called again with the same
arguments, and whose every output folder still verifies against its manifest, prints the same summary and stops.
There is no copy of the stages' keys here: a stage that gains a cache input declares it in its own module, and
this record checks it. Anything else (a change, a missing or altered folder, --force, an artifact root shared with
other hosts) runs the flow as before.
"""
from __future__ import annotations

import json
from pathlib import Path

from culbot.pipeline_config.schema import DataProfile
from culbot.pipeline_config.train_schema import TrainProfile
from culbot.tasks import _prefect, _store
from culbot.tasks.contracts import ChainResult, StageOutput

RECORDS = "chains"   # under the training profile's artifacts_root


def fingerprint(dp: DataProfile, tp: TrainProfile, to_stage: str) -> str:
    from culbot.flows.deployed import culbot_version

    return _store.hash_json({"version": culbot_version(), "to_stage": to_stage, "home": str(Path.cwd().resolve()),
                             "data": dp.model_dump(mode="json"), "train": tp.model_dump(mode="json")})


def outputs(result: ChainResult) -> list[StageOutput]:
    data = result.data
    out = [*data.stages.values(), data.dataset, data.formatted, data.index, result.tokenized, result.run, result.eval, result.model,
           result.publish]
    return [o for o in out if o is not None]


def record_path(tp: TrainProfile, fp: str) -> Path:
    return Path(tp.artifacts_root) / RECORDS / f"{fp[:24]}.json"


def keys_path(tp: TrainProfile, fp: str) -> Path:
    return Path(tp.artifacts_root) / RECORDS / f"{fp[:24]}.keys.json"


def changed_keys(tp: TrainProfile, fp: str) -> list[str] | None:
    """The declared key parts of the recorded run that differ now ("module:function"); None without a record."""
    p = keys_path(tp, fp)
    try:
        keys = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return [k["fn"] for k in keys if not _prefect.recheck(k)]


def recorded(tp: TrainProfile, fp: str) -> ChainResult | None:
    """The last identical chain's result, if every key part its stages declared is unchanged and every folder it names
    is still there and verifies."""
    from pydantic import ValidationError

    p = record_path(tp, fp)
    if not p.is_file() or changed_keys(tp, fp) != []:
        return None
    try:
        result = _store.read_model(p, ChainResult)
    except (ValidationError, ValueError, OSError):
        return None
    from culbot.flows.runner import verified

    return result if all(verified(out) for out in outputs(result)) else None


def start() -> None:
    """Forget the key parts of an earlier run in this process (the record keeps this run's only)."""
    _prefect.KEYS.clear()


def save_keys(tp: TrainProfile, fp: str) -> Path:
    """The key parts the stages declared in this process, as the chain's record checks them."""
    keys = sorted(_prefect.KEYS.values(), key=lambda k: (k["fn"], json.dumps(k["args"], sort_keys=True)))
    return _store.atomic_write_text(keys_path(tp, fp), json.dumps(keys, ensure_ascii=False, indent=1))


def record(tp: TrainProfile, fp: str, result: ChainResult) -> Path:
    """The result, and the key parts its stages declared (written first: a record without its keys is never trusted)."""
    save_keys(tp, fp)
    return _store.write_model(record_path(tp, fp), result)
