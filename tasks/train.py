"""Train a LoRA adapter: the Prefect side. Write the run config, launch the entrypoint, stream its output.

Run as: culbot train --train-profile cpu-tiny --data artifacts/tokenized/<hash>   (or a formatted folder: tokenized first)

The run config (runs/<id>/config.json, a RunConfig) holds the resolved profile, the run card
the adapter will carry, and paths relative to the run folder. The entrypoint (train_entry.py,
no Prefect) is launched as a subprocess with python, torchrun or deepspeed and its output is
streamed line by line. The run id is a hash of the tokenized data, the base model and the
profile, so a rerun of the same training finds its folder and resumes from the newest
complete checkpoint.
"""
from __future__ import annotations

import base64
import collections
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator


from culbot.pipeline_config.train_schema import TrainProfile

from . import _store
from ._prefect import stage_task
from .contracts import (
    RUN_CONFIG_FILE, TEMPLATES_FILE, TRAIN_RESULT_FILE, Hyperparameters, RunCard, RunConfig, RunOutput, Stage, StageRef, TemplateSet,
    TokenCounts, TrainResult, short_hash,
)
from . import artifact_root as _artifact_root
from .loss_curve import LOSS_CURVE_PNG, curve_points, plot
from .quiet import QUIET_ENV
from .model_io import resolve_base
from .plan import check_fits
from .run_folder import ADAPTER, finished_result, read_config, run_output
from .train_entry import EXIT_GUARD, EXIT_PREEMPTED  # cheap: the entrypoint imports its heavy libraries in main()

log = logging.getLogger("culbot.train")


class TrainingFailed(RuntimeError):
    """The training subprocess failed; the message carries its exit status and last lines."""

    exit_code = 1


class GuardFailure(TrainingFailed):
    """A guard stopped the run (NaN, collapse, exploding gradients); it can never be published."""

    exit_code = EXIT_GUARD


class Preempted(TrainingFailed):
    """The run got SIGTERM or SIGINT (a spot pod reclaimed, a stop) and saved a checkpoint; rerun to resume."""

    exit_code = EXIT_PREEMPTED


@contextlib.contextmanager
def signals_forwarded(proc: subprocess.Popen) -> Iterator[list[int]]:
    """Pass SIGTERM and SIGINT on to the trainer, which checkpoints and exits 75, instead of dying with it.

    Only where nobody else owns the signal (the CLI). Under a Prefect worker, Prefect's handler raises
    TerminationSignal for its cancellation, and run_training forwards it from its except-branch.
    """
    received: list[int] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
                previous[sig] = signal.signal(sig, forward)
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# Sections about what happens after training: changing them never retrains.
AFTER_TRAINING = {"eval", "answer", "merge_adapter", "publish"}


def prepare_run(tp: TrainProfile, tokenized_dir: Path | StageRef, *, runs_root: Path | None = None, models_root: Path | None = None,
                samples_dir: Path | None = None) -> Path:
    """Resolve the base model and write runs/<id>/config.json. Returns the config path."""
    check_fits(tp)  # before anything is downloaded
    runs_root, models_root = runs_root or tp.runs_root, models_root or tp.models_root
    tokenized_dir, tokenized = _store.read_input(tokenized_dir, "train input is not a finished tokenized dataset")
    tokenized_dir = tokenized_dir.resolve()
    base = resolve_base(tp.model, models_root=models_root, samples_dir=samples_dir or tp.samples_dir)
    run_id = _store.hash_json({"tokenized": tokenized.content_hash, "profile": tp.model_dump(mode="json", exclude=AFTER_TRAINING),
                               "base": base.name, "revision": base.revision})
    run_dir = (Path(runs_root) / f"{tp.name}-{short_hash(run_id)}").resolve()
    card = RunCard(
        base=base.relocated(Path.cwd(), run_dir),
        lineage=tokenized.lineage.then(tokenized=tokenized.content_hash),
        templates=_store.read_model(tokenized_dir / TEMPLATES_FILE, TemplateSet),
        profile=tp.name,
        hyperparameters=Hyperparameters(lora=tp.lora, train=tp.train, tokenize=tp.tokenize, model=tp.model),
        token_counts=TokenCounts.model_validate(tokenized.counts),
    )
    ds = tp.deepspeed_path()
    if ds is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ds, run_dir / "deepspeed.json")
    config = RunConfig(
        run_name=f"culbot-{tp.name}-{short_hash(card.lineage.dataset or tokenized.content_hash)}-{short_hash(run_id)}",
        profile=tp, data=os.path.relpath(tokenized_dir, run_dir), deepspeed="deepspeed.json" if ds else None, card=card)
    return _store.write_model(run_dir / RUN_CONFIG_FILE, config)


def launch_command(tp: TrainProfile, config_path: Path) -> list[str]:
    """The exact command that starts training for this profile."""
    hw = tp.hardware
    entry = ["--config", str(config_path)]
    if hw.launcher == "deepspeed":
        # as a module, like the other launchers: a script path would put tasks/ first on sys.path, where tokenize.py
        # would shadow the standard library's tokenize
        return ["deepspeed", "--num_gpus", str(hw.gpus), "--module", "culbot.tasks.train_entry", *entry]
    if hw.launcher == "torchrun" and (hw.gpus > 1 or tp.deepspeed):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(hw.gpus),
                "-m", "culbot.tasks.train_entry", *entry]
    return [sys.executable, "-m", "culbot.tasks.train_entry", *entry]


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class TrainerLines:
    """What the entrypoint prints, as log lines: its JSON step logs as readable progress with the time elapsed and an
    ETA (from the steps this process ran since training started: model loading is not counted), its own lines without
    their tag, "LEVEL logger: message" lines at their level (tasks/quiet.py routes warnings so), blank lines dropped."""

    LEVELED = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+): (.*)$")
    STARTED = re.compile(r"^\[culbot\.train\] (?:starting from step (\d+)|resuming from checkpoint-(\d+))")

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.launched = clock()
        self.started: tuple[float, int] | None = None   # (time, step) when training began in this process

    def progress(self, step: int, max_steps: int) -> str:
        now = self.clock()
        text = f"elapsed {_hms(now - self.launched)}"
        if self.started and step > self.started[1] and max_steps > 0:
            per_step = (now - self.started[0]) / (step - self.started[1])
            text += f", ETA {_hms(per_step * (max_steps - step))}"
        return text

    def __call__(self, line: str) -> None:
        if not line.strip():
            return
        if line.startswith("culbot-log "):
            d = json.loads(line[len("culbot-log "):])
            if "loss" in d:
                log.info("step %s/%s  loss %.4f  grad norm %.3g  lr %.3g  (%s)", d["step"], d["max_steps"], d["loss"],
                         d.get("grad_norm", float("nan")), d.get("learning_rate", 0), self.progress(d["step"], d["max_steps"]))
            elif "eval_loss" in d:
                log.info("step %s/%s  eval loss %.4f  (%s)", d["step"], d["max_steps"], d["eval_loss"], self.progress(d["step"], d["max_steps"]))
            return
        started = self.STARTED.match(line)
        if started:
            self.started = (self.clock(), int(started.group(1) or started.group(2)))
        leveled = self.LEVELED.match(line)
        if leveled:
            log.log(logging.getLevelName(leveled.group(1)), "%s: %s", leveled.group(2), leveled.group(3))
            return
        log.info(line.removeprefix("[culbot.train] "))


FAULT_LINE = re.compile(r"Error|Exception|terminate called|what\(\):|Abort|Segmentation fault|Killed|out of memory")


def run_training(config_path: Path, tp: TrainProfile, *, on_line: Callable[[str], None] | None = None,
                 env: dict[str, str] | None = None) -> TrainResult:
    """Launch, stream, and map the exit status; a finished run returns its result at once."""
    config_path = Path(config_path)
    run_dir = config_path.parent
    done = finished_result(run_dir)
    if done is not None:
        log.info("run %s already completed; nothing to do", run_dir.name)
        return done
    (run_dir / TRAIN_RESULT_FILE).unlink(missing_ok=True)
    cmd = launch_command(tp, config_path)
    log.info("launching: %s", " ".join(cmd))
    tail: collections.deque[str] = collections.deque(maxlen=40)
    first_errors: list[str] = []   # a rank's own error comes before the launcher's summary, which fills the tail
    lines = TrainerLines()
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **QUIET_ENV, **(env or {})}
    t0 = time.monotonic()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env, bufsize=1) as proc, \
            signals_forwarded(proc):
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                if len(first_errors) < 12 and FAULT_LINE.search(line):
                    first_errors.append(line)
                (on_line or lines)(line)
        except BaseException:
            # Prefect's cancellation (TerminationSignal) or an interrupt: the trainer checkpoints on SIGTERM, then we go on.
            proc.terminate()
            code = proc.wait(timeout=600)
            log.warning("training stopped (exit %s)%s", code, "; preempted, resumable: the next run resumes from its checkpoint"
                        if code == EXIT_PREEMPTED else "")
            raise
        code = proc.wait()
    last = "\n".join(tail)
    if first_errors and not set(first_errors) <= set(tail):
        last = "First error lines:\n" + "\n".join(first_errors) + "\n...\n" + last
    if code == EXIT_GUARD:
        raise GuardFailure(f"training stopped by a guard (exit {code}); this run can never be published.\n{last}")
    if code == EXIT_PREEMPTED:
        step = _store.read_model(run_dir / TRAIN_RESULT_FILE, TrainResult).global_step if (run_dir / TRAIN_RESULT_FILE).is_file() else "?"
        raise Preempted(f"preempted, resumable: training stopped at step {step} and saved a checkpoint; rerun to resume from it")
    if code != 0:
        raise TrainingFailed(f"training exited with status {code}. Last lines:\n{last}")
    result = _store.read_model(run_dir / TRAIN_RESULT_FILE, TrainResult)
    config = read_config(run_dir)
    _store.write_manifest(run_dir / ADAPTER, stage="train", inputs={"config": _store.sha256_file(config_path)},
                          lineage=config.card.lineage, config=tp.model_dump(mode="json"),
                          counts={"global_step": result.global_step, **result.metrics,
                                  "packing": result.packing.model_dump() if result.packing else None},
                          timings={"train": time.monotonic() - t0})
    log.info("training finished in %.1fs", time.monotonic() - t0)
    try:
        plot(result, run_dir / LOSS_CURVE_PNG, f"{run_dir.name}: {tp.model.base}")
    except Exception as e:   # the run is complete and verified; a missing picture is not worth failing it
        log.warning("could not draw %s: %s", LOSS_CURVE_PNG, e)
    return result


INLINE_PNG_MAX_BYTES = 512 * 1024   # a loss curve is ~40 KB; anything much larger stays a link only


def curve_markdown(result: TrainResult, run_dir: Path, png_link: str | None = None, png: bytes | None = None) -> str:
    """The training artifact: steps, final losses, packing, the loss-curve PNG itself (``png``, inline as a data URI, so
    the Prefect UI shows it on any host) and a link to its file (the points are a table artifact)."""
    evals = [h["eval_loss"] for h in result.log_history if "eval_loss" in h]
    lines = [f"# Training `{Path(run_dir).name}`", "",
             f"{result.global_step} optimizer steps, train loss {result.metrics.get('train_loss', float('nan')):.4f}"
             + (f", last eval loss {evals[-1]:.4f}" if evals else ""), ""]
    if result.packing:
        pk = result.packing
        lines += [f"Packed {pk.examples:,} examples into {pk.rows:,} rows of up to {pk.max_len} tokens: "
                  f"{pk.real_token_share:.1%} real tokens, {pk.examples_per_row} examples per row.", ""]
    if png_link:   # a link only where a browser opens it; a path or a bucket URL is named (the UI cannot open file://)
        where = f"[{LOSS_CURVE_PNG}]({png_link})" if png_link.startswith(("http://", "https://")) else f"`{png_link}`"
        lines += [f"Loss curve (train and eval loss, learning rate): {where}", ""]
    if png and len(png) <= INLINE_PNG_MAX_BYTES:
        lines += [f"![loss curve](data:image/png;base64,{base64.b64encode(png).decode('ascii')})", ""]
    lines += ["Every logged step: the table artifact `training-curve-points`.", ""]
    return "\n".join(lines)


# ----- Prefect task -----------------------------------------------------------

def _retry_if_preempted(task, task_run, state) -> bool:
    """Retry (and so resume from the newest checkpoint) only when the run was preempted."""
    try:
        state.result()
    except Preempted:
        return True
    except Exception:
        return False
    return False


def _link(path: Path) -> str:
    """Where a reader finds a file of the run: its place in the artifact root once pushed (every host sees it), else its
    path here."""
    root = _artifact_root.configured()
    try:
        return _artifact_root.url_for(path, root) if root else str(path.resolve())
    except _artifact_root.TransferError:   # a run outside the working directory is not shared
        return str(path.resolve())


STAGE = Stage(name="train", module=__name__, profile="train", section="train")


@stage_task(STAGE, retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_if_preempted)
def train_task(tp: TrainProfile, tokenized: StageRef) -> RunOutput:
    """Launch the training subprocess and stream it; a retry after preemption resumes."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    config = prepare_run(tp, tokenized)
    result = run_training(config, tp, env=tp.run_env())
    png = config.parent / LOSS_CURVE_PNG
    create_markdown_artifact(curve_markdown(result, config.parent, _link(png) if png.is_file() else None,
                                            png.read_bytes() if png.is_file() else None), key="training-curve",
                             description="Training curve summary")
    create_table_artifact(curve_points(result)[-500:], key="training-curve-points", description="Train loss, eval loss and learning rate per step")
    return run_output(config.parent)
