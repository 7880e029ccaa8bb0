"""Stage 7: train a LoRA adapter. The Prefect side: resolve, tokenize, launch, stream.

Run as: culbot train --profile cpu-tiny --data artifacts/formatted/<hash>

The profile is resolved and written next to the run (runs/<id>/config.json), the
entrypoint (tasks/train_entry.py, no Prefect) is launched as a subprocess with
python, torchrun or deepspeed, and its output is streamed line by line. The run
id is a hash of data, base model and profile, so a rerun of the same training
finds its folder and resumes from the newest complete checkpoint.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from culbot.pipeline_config.train_schema import TINY, TrainProfile

from . import _store
from .train_entry import EXIT_GUARD, EXIT_PREEMPTED  # cheap: the entrypoint imports its heavy libraries in main()

log = logging.getLogger("culbot.train")



class TrainingFailed(RuntimeError):
    """The training subprocess failed; the message carries its exit status and last lines."""


class GuardFailure(TrainingFailed):
    """A guard stopped the run (NaN, collapse, exploding gradients); it can never be published."""


class Preempted(TrainingFailed):
    """The run got SIGTERM (e.g. a spot pod reclaimed) and saved a checkpoint; rerun to resume."""


def resolve_base(spec_base: str, revision: str, *, models_root: Path, samples_dir: Path) -> tuple[str, str | None]:
    """(path or hub id to load, commit sha or None). The tiny model is built on first use."""
    if spec_base == TINY:
        from .tiny_model import build_tiny_model, sample_corpus

        out = Path(models_root) / "tiny"
        build_tiny_model(out, sample_corpus(samples_dir))
        return str(out.resolve()), None
    if Path(spec_base).exists():
        return str(Path(spec_base).resolve()), None  # absolute: peft stores it as given
    from huggingface_hub import HfApi

    return spec_base, HfApi().model_info(spec_base, revision=revision).sha


def prepare_run(profile: TrainProfile, formatted_dir: Path, *, runs_root: Path | None = None, models_root: Path | None = None,
                tokenized_root: Path | None = None, samples_dir: Path | None = None) -> Path:
    """Resolve the base model, tokenize, and write runs/<id>/config.json. Returns the config path."""
    from .plan import check_fits
    from .tokenize_data import run_tokenize

    check_fits(profile)  # before tokenizing or downloading anything
    root = Path(profile.artifacts_root)
    runs_root, models_root, tokenized_root = runs_root or root / "runs", models_root or root / "models", tokenized_root or root / "tokenized"
    samples_dir = samples_dir or profile.samples_dir

    formatted_dir = Path(formatted_dir)
    fm = _store.read_manifest(formatted_dir)
    if fm is None:
        raise RuntimeError(f"{formatted_dir}: not a finished formatted dataset (no manifest)")
    model_path, sha = resolve_base(profile.model.base, profile.model.revision, models_root=models_root, samples_dir=samples_dir)
    tok = run_tokenize(formatted_dir, model_path, tokenized_root, revision=sha, cutoff_len=profile.data.cutoff_len,
                       train_on_inputs=profile.data.train_on_inputs, overlength=profile.data.overlength)
    resolved = profile.model_dump(mode="json")
    saved_templates = _store.read_json(formatted_dir / "templates.json")
    dataset_manifest = _store.read_manifest(fm["inputs"]["dataset_path"]) or {}
    data_counts = dataset_manifest.get("counts", {})
    run_id = _store.hash_json({"tokenized": tok["content_hash"], "profile": resolved, "base": profile.model.base, "sha": sha})[:16]
    run_dir = Path(runs_root).resolve() / f"{profile.name}-{run_id}"
    ds = profile.deepspeed_path()
    config = {
        "run_name": f"culbot-{profile.name}-{fm.get('dataset_version') or fm['content_hash'][:8]}-{run_id[:6]}",
        "run_dir": str(run_dir),
        "profile": resolved,
        "model_path": model_path,
        "revision": sha,
        "data": tok["path"],
        "deepspeed": str(ds.resolve()) if ds else None,
        "metadata": {
            "base_model": profile.model.base if profile.model.base != TINY else model_path,
            "base_revision": sha,
            "dataset_hash": fm["inputs"]["dataset"],
            "formatted_hash": fm["content_hash"],
            "tokenized_hash": tok["content_hash"],
            "templates": saved_templates["templates"],
            "template_map": saved_templates["map"],
            "default_template": saved_templates["default"],
            "data_mix": {"train": data_counts.get("train_by_source", {}), "validation": data_counts.get("validation_by_source", {})},
            "profile": profile.name,
            "hyperparameters": {"lora": resolved["lora"], "train": resolved["train"], "data": resolved["data"],
                                "model": resolved["model"]},
            "token_counts": tok["counts"],
        },
    }
    _store.atomic_write_json(run_dir / "config.json", config)
    return run_dir / "config.json"


def launch_command(profile: TrainProfile, config_path: Path) -> list[str]:
    """The exact command that starts training for this profile."""
    hw = profile.hardware
    entry = ["--config", str(config_path)]
    if hw.launcher == "deepspeed":
        script = str(Path(__file__).resolve().with_name("train_entry.py"))
        return ["deepspeed", "--num_gpus", str(hw.gpus), script, *entry]
    if hw.launcher == "torchrun" and (hw.gpus > 1 or profile.deepspeed):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(hw.gpus),
                "-m", "culbot.tasks.train_entry", *entry]
    return [sys.executable, "-m", "culbot.tasks.train_entry", *entry]


def log_line(line: str) -> None:
    """Readable progress from the entrypoint's JSON log lines; everything else as is."""
    if line.startswith("culbot-log "):
        d = json.loads(line[len("culbot-log "):])
        if "loss" in d:
            log.info("step %s/%s  loss %.4f  grad norm %.3g  lr %.3g", d["step"], d["max_steps"], d["loss"], d.get("grad_norm", float("nan")), d.get("learning_rate", 0))
        elif "eval_loss" in d:
            log.info("step %s/%s  eval loss %.4f", d["step"], d["max_steps"], d["eval_loss"])
        return
    log.info(line)


def run_training(config_path: Path, profile: TrainProfile, *, on_line: Callable[[str], None] | None = None,
                 env: dict[str, str] | None = None) -> dict:
    """Launch, stream, and map the exit status; a finished run returns its result at once."""
    config_path = Path(config_path)
    run_dir = config_path.parent
    done = run_dir / "train_result.json"
    if done.is_file() and json.loads(done.read_text()).get("status") == "completed" and _store.is_complete(run_dir / "adapter"):
        log.info("run %s already completed; nothing to do", run_dir.name)
        return json.loads(done.read_text())
    done.unlink(missing_ok=True)
    cmd = launch_command(profile, config_path)
    log.info("launching: %s", " ".join(cmd))
    tail: collections.deque[str] = collections.deque(maxlen=40)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    t0 = time.monotonic()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env, bufsize=1) as proc:
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                (on_line or log_line)(line)
        except BaseException:
            proc.terminate()  # a cancelled flow must not leave the trainer running; it checkpoints on SIGTERM
            proc.wait(timeout=120)
            raise
        code = proc.wait()
    last = "\n".join(tail)
    if code == EXIT_GUARD:
        raise GuardFailure(f"training stopped by a guard (exit {code}); this run can never be published.\n{last}")
    if code == EXIT_PREEMPTED:
        raise Preempted(f"training was preempted (exit {code}) and saved a checkpoint; rerun to resume.\n{last}")
    if code != 0:
        raise TrainingFailed(f"training exited with status {code}. Last lines:\n{last}")
    result = json.loads(done.read_text())
    _store.write_manifest(run_dir / "adapter", stage="train", inputs={"config": _store.sha256_file(config_path)},
                          config=profile.model_dump(mode="json"), counts={"global_step": result["global_step"], **result["metrics"],
                                                    "packing": result.get("packing")},
                          timings={"train": time.monotonic() - t0})
    log.info("training finished in %.1fs", time.monotonic() - t0)
    return result
