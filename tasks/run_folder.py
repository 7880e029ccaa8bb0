"""A training run folder and the model folders made from it: their layout, and readers of what they say.

    runs/<profile>-<id>/
        config.json         RunConfig: the resolved profile, the data, the run card to be
        checkpoints/        full Trainer checkpoints (stay on the training host)
        train_result.json   TrainResult
        adapter/            the LoRA adapter, its tokenizer, culbot.json (RunCard), manifest
        eval/               eval.json (EvalReport), eval.md, manifest
        publish/            record.json, manifest

The train, eval, merge-adapter and publish stages share this module, not each other.
"""
from __future__ import annotations

from pathlib import Path

from . import _store
from .contracts import RUN_CARD_FILE, RUN_CONFIG_FILE, TRAIN_RESULT_FILE, RunCard, RunConfig, RunOutput, TrainResult

ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
EVAL = "eval"
PUBLISH = "publish"


class ProfileMismatch(ValueError):
    """A run's later stage was given another training profile than the run was trained with."""


def trained_with(run_dir: Path) -> str:
    """The name of the training profile the run was trained with (its config.json)."""
    return read_config(run_dir).profile.name


def require_profile(run_dir: Path, profile: str, stage: str) -> None:
    """Eval, merge-adapter and publish read the profile's settings for the run: they must be the run's own profile's."""
    if (Path(run_dir) / RUN_CONFIG_FILE).is_file() and trained_with(run_dir) != profile:
        had = trained_with(run_dir)
        raise ProfileMismatch(f"{stage}: run {Path(run_dir).name} was trained with training profile {had!r}, not {profile!r}; "
                              f"give train_profile {had} (CLI: --train-profile {had}, or leave it out to take the run's)")


class RunNotFinished(RuntimeError):
    """The run has no completed training result (failed, preempted or never run), or its adapter does not verify."""


def read_config(run_dir: Path) -> RunConfig:
    return _store.read_model(Path(run_dir) / RUN_CONFIG_FILE, RunConfig)


def read_run_card(folder: Path) -> RunCard:
    """The run card of an adapter or merged-model folder."""
    p = Path(folder) / RUN_CARD_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{folder}: no {RUN_CARD_FILE}; is this a finished adapter or merged model?")
    return _store.read_model(p, RunCard)


def finished_result(run_dir: Path) -> TrainResult | None:
    """The run's result if it completed and its adapter still verifies."""
    done = Path(run_dir) / TRAIN_RESULT_FILE
    if not done.is_file():
        return None
    result = _store.read_model(done, TrainResult)
    return result if result.status == "completed" and _store.is_complete(Path(run_dir) / ADAPTER) else None


def require_completed(run_dir: Path) -> TrainResult:
    result = finished_result(run_dir)
    if result is None and not (Path(run_dir) / RUN_CONFIG_FILE).is_file():
        near = sorted(Path(run_dir).glob(f"*/{RUN_CONFIG_FILE}"))
        hint = f"; run folders in it: {', '.join(p.parent.name for p in near[-3:])}" if near else \
            " (a run folder is artifacts/runs/<profile>-<id>/, with config.json)"
        raise RunNotFinished(f"{run_dir}: not a run folder{hint}")
    if result is None:
        done = Path(run_dir) / TRAIN_RESULT_FILE
        status = _store.read_model(done, TrainResult).status if done.is_file() else "missing"
        raise RunNotFinished(f"{Path(run_dir).name}: training status is {status!r}; only a completed run that passed "
                             f"its guards (and whose adapter verifies) can be evaluated, merged or published")
    return result


def run_output(run_dir: Path) -> RunOutput:
    """The train stage's output for a finished run folder."""
    run_dir = Path(run_dir).resolve()
    result = require_completed(run_dir)
    m = _store.read_manifest(run_dir / ADAPTER)
    return RunOutput(path=run_dir / ADAPTER, content_hash=m.content_hash, stage="train", counts=m.counts, run_dir=run_dir,
                     global_step=result.global_step, packing=result.packing)
