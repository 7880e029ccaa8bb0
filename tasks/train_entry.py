"""Training entrypoint: LoRA/QLoRA fine-tuning with the transformers Trainer. No Prefect in here.

Run as: python -m culbot.tasks.train_entry --config RUN/config.json
        torchrun --nproc_per_node 4 -m culbot.tasks.train_entry --config RUN/config.json
        deepspeed --num_gpus 2 tasks/train_entry.py --config RUN/config.json

RUN/config.json (a RunConfig, validated here on entry) is written by the train
stage: the resolved profile, the base model, the tokenized data (paths relative
to RUN) and the run card the adapter will carry. A rerun resumes from the newest
complete checkpoint; when that checkpoint is the last step, its weights are saved
as the adapter without training.
Exit codes: 0 done, 3 stopped by a guard (never publishable), 75 preempted
(SIGTERM; a checkpoint was saved), anything else a crash.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import signal
import sys
import time
from pathlib import Path

from culbot.tasks import _store
from culbot.tasks.contracts import RUN_CARD_FILE, TRAIN_RESULT_FILE, RunConfig, TrainResult
from culbot.tasks.model_io import torch_dtype
from culbot.tasks.quiet import quiet
from culbot.tasks.run_folder import ADAPTER, CHECKPOINTS
from culbot.tasks.templates import EXAMPLE_QUESTION, install_chat_templates, render_prompt

EXIT_GUARD = 3
EXIT_PREEMPTED = 75
MARKER = "culbot_complete.json"


class GuardTripped(RuntimeError):
    """The loss or gradient went wrong; the run is failed and can never be published."""


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def say(msg: str) -> None:
    if rank() == 0:
        print(f"[culbot.train] {msg}", flush=True)


# ----- checkpoints ----------------------------------------------------------------

def checkpoint_files(ckpt: Path) -> dict[str, dict]:
    """Every file of a checkpoint but the marker: relative path -> size and sha256."""
    return {p.relative_to(ckpt).as_posix(): {"size": p.stat().st_size, "sha256": _store.sha256_file(p)}
            for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != MARKER}


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (no marker, a file missing, cut or changed), or None."""
    try:
        marker = json.loads((ckpt / MARKER).read_text())
        json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"incomplete ({type(e).__name__}: {e})"
    for rel, want in marker.get("files", {}).items():
        f = ckpt / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != want["size"]:
            return f"{rel} has size {f.stat().st_size}, not the {want['size']} bytes written"
        if _store.sha256_file(f) != want["sha256"]:
            return f"{rel} does not match the hash written with it"
    return None


def newest_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint-N whose marker lists files that are all there, whole and unchanged."""
    if not ckpt_dir.is_dir():
        return None
    found = sorted((p for p in ckpt_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)),
                   key=lambda p: int(p.name.split("-")[1]), reverse=True)
    for p in found:
        problem = checkpoint_problem(p)
        if problem is None:
            return p
        say(f"skipping incomplete or corrupt checkpoint {p.name}: {problem}")
    return None


def final_state(checkpoint: Path | None) -> dict | None:
    """The checkpoint's trainer state when it is the run's last step (nothing is left to train), else None."""
    if checkpoint is None:
        return None
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state if 0 < state.get("max_steps", 0) <= state["global_step"] else None


# ----- model -----------------------------------------------------------------------

def load_model(spec, model_path: str, revision: str | None, use_cpu: bool):
    """The base model per the profile's ``model`` section (a ModelConfig): dtype, quantisation, checkpointing, no KV cache."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": torch_dtype(spec.dtype), "attn_implementation": spec.attn_implementation, "revision": revision}
    if spec.quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=spec.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=spec.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=torch_dtype(spec.bnb_4bit_compute_dtype))
    elif spec.quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if not use_cpu and spec.quantization != "none":
        # k-bit weights are quantised as they load onto the GPU: place each rank's copy on its own device
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if spec.quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing)
    elif spec.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.config.use_cache = False
    return model


def generation_config(model, tokenizer, stop_ids: list[int]):
    """The base model's generation config, stopping on every end token the run learned (Llama-3 chat: <|eot_id|>)."""
    from transformers import GenerationConfig

    gc = model.generation_config if model.generation_config is not None else GenerationConfig()
    gc = GenerationConfig.from_dict({**gc.to_dict(), "bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id,
                                     "eos_token_id": stop_ids[0] if len(stop_ids) == 1 else stop_ids})
    return gc


def apply_lora(model, lora):
    """LoRA per the profile's ``lora`` section (a LoraConfig): the names given, peft's own 'all-linear', or the
    architecture's default (pipeline_config/models/families.yaml). Returns the layers peft actually adapted."""
    from peft import LoraConfig, get_peft_model

    from culbot.pipeline_config.model_schema import family

    targets = lora.target_modules if lora.target_modules is not None else family(model.config.model_type).lora_targets
    config = LoraConfig(task_type="CAUSAL_LM", r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=targets, bias="none")
    model = get_peft_model(model, config)
    resolved = sorted({t.rsplit(".", 1)[-1] for t in model.peft_config["default"].target_modules})   # all-linear: peft resolved it
    trainable, total = model.get_nb_trainable_parameters()
    say(f"LoRA on {resolved}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")
    return model, resolved


# ----- callbacks --------------------------------------------------------------------

def make_callbacks(guards, ckpt_dir: Path, run_dir: Path):
    """Guard (per the profile's ``guards`` section), preemption, checkpoint marker and JSON log lines."""
    from transformers import TrainerCallback

    class Guard(TrainerCallback):
        """Stop on NaN/inf loss, on a loss collapsing towards 0, or on an exploding grad norm."""

        def __init__(self):
            self.low = 0

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            for key in ("loss", "eval_loss"):
                v = logs.get(key)
                if v is not None and not math.isfinite(v):
                    raise GuardTripped(f"{key} is {v} at step {state.global_step}")
            loss = logs.get("loss")
            if loss is not None:
                self.low = self.low + 1 if loss < guards.collapse_below else 0
                if self.low >= guards.collapse_logs:
                    raise GuardTripped(f"loss collapsed: {self.low} consecutive logs below {guards.collapse_below} (last {loss:.5f}) at step {state.global_step}")
            g = logs.get("grad_norm")
            if g is not None and (not math.isfinite(g) or g > guards.grad_norm_limit):
                raise GuardTripped(f"grad norm {g} exceeds {guards.grad_norm_limit} at step {state.global_step}")

    class Preemption(TrainerCallback):
        """On SIGTERM (spot pods, a stop forwarded by `culbot train`) or SIGINT (Ctrl-C), save a checkpoint at the end
        of the step and stop."""

        def __init__(self):
            self.requested = False
            signal.signal(signal.SIGTERM, self._on_term)
            signal.signal(signal.SIGINT, self._on_term)

        def _on_term(self, signum, frame):
            if not self.requested:
                say(f"{signal.Signals(signum).name} received: saving a checkpoint and stopping")
            self.requested = True

        def on_step_end(self, args, state, control, **kw):
            if self.requested:
                control.should_save = True
                control.should_training_stop = True

    class CheckpointMarker(TrainerCallback):
        """Mark a checkpoint complete only after the Trainer finished writing it."""

        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:
                p = ckpt_dir / f"checkpoint-{state.global_step}"
                if p.is_dir():
                    _store.atomic_write_json(p / MARKER, {"step": state.global_step, "at": time.time(), "files": checkpoint_files(p)})

    class LogLines(TrainerCallback):
        """One JSON line per log, for the Prefect side to stream and summarise."""

        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs:
                print("culbot-log " + json.dumps({"step": state.global_step, "max_steps": state.max_steps, **logs}), flush=True)

    return Guard(), Preemption(), CheckpointMarker(), LogLines()


# ----- metrics -------------------------------------------------------------------------

def run_metrics(trainer_metrics: dict, log_history: list[dict], resumed_step: int, global_step: int) -> dict:
    """The metrics of the run that produced the weights.

    After a resume the Trainer's figures cover only the steps this process ran (none when the
    newest checkpoint was the last one); the train loss is then the mean of every logged loss
    of the run, and the result says which checkpoint it carried over from.
    """
    if resumed_step == 0:
        return trainer_metrics
    losses = [h["loss"] for h in log_history if "loss" in h]
    return {"train_loss": sum(losses) / len(losses) if losses else float("nan"), "carried_over_from": f"checkpoint-{resumed_step}",
            "steps_this_process": global_step - resumed_step,
            **{f"this_process_{k}": v for k, v in trainer_metrics.items() if k != "train_loss"}}


# ----- W&B -----------------------------------------------------------------------------

def wandb_key_problem(key: str) -> str | None:
    """Why W&B refuses ``key`` (checked with its own auth call, nothing written to ~/.netrc), or None."""
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    try:
        from wandb.sdk.lib import wbauth

        wbauth.AuthApiKey(host=host, api_key=key).verify()
    except Exception as e:
        return f"{type(e).__name__}: {str(e).replace(key, '***')[:300]}"
    return None


def wandb_offline_unless_the_key_works(report: str) -> None:
    """report_to 'auto' without WANDB_API_KEY logs offline; with a key, or 'wandb', online, unless W&B refuses the key
    or cannot be reached: then offline with one warning naming the variable, instead of a wandb traceback and exit 1
    after the model has loaded."""
    key = os.environ.get("WANDB_API_KEY", "")
    if os.environ.get("WANDB_MODE", "online") in ("offline", "disabled", "dryrun"):
        return
    if not key:
        if report == "auto":
            os.environ["WANDB_MODE"] = "offline"
        return
    problem = wandb_key_problem(key)
    if problem:
        logging.getLogger("culbot.train").warning(
            "W&B did not accept WANDB_API_KEY (%s); logging offline to %s instead (`wandb sync` uploads it once the key "
            "works)", problem, Path(os.environ.get("WANDB_DIR", ".")) / "wandb")
        os.environ["WANDB_MODE"] = "offline"
        # the check built wandb's settings singleton from the online environment; drop it and the key so that
        # wandb.init reads WANDB_MODE afresh and its telemetry exporter does not send the refused key
        del os.environ["WANDB_API_KEY"]
        import wandb

        wandb.teardown()


# ----- main ---------------------------------------------------------------------------

def training_data(run: RunConfig, run_dir: Path, pad_token_id: int):
    """The tokenized splits, the collator, and packing statistics when the profile packs."""
    import datasets

    from culbot.tasks.collate import PackedRows, PadCollator, PositionCollator

    settings, sched = run.profile.tokenize, run.profile.train
    tok_dir = run.data_dir(run_dir)
    train_ds = datasets.Dataset.from_parquet(str(tok_dir / "train.parquet")).select_columns(["input_ids", "labels", "length"])
    eval_ds = datasets.Dataset.from_parquet(str(tok_dir / "validation.parquet")).select_columns(["input_ids", "labels"])
    if not settings.packing:
        return train_ds, eval_ds, PadCollator(pad_token_id), None
    # Whole rows of up to cutoff_len tokens; position_ids keep examples apart, because load_model turned the KV cache off.
    train_ds = PackedRows(train_ds, settings.cutoff_len)
    packing = train_ds.stats()
    say(f"packed {packing.examples:,} examples into {packing.rows:,} rows of <= {packing.max_len} tokens: "
        f"{packing.real_token_share:.1%} real tokens, {packing.examples_per_row} examples per row")
    return train_ds, eval_ds, PositionCollator(pad_token_id, pad_to=settings.cutoff_len if sched.torch_compile else None), packing


def training_arguments(run: RunConfig, run_dir: Path, with_eval: bool):
    """transformers' TrainingArguments from the profile's schedule and hardware."""
    from transformers import TrainingArguments

    hw, spec, sched = run.profile.hardware, run.profile.model, run.profile.train
    report = sched.report_to
    if report != "none":
        wandb_offline_unless_the_key_works(report)
        report = "wandb"
    precision = {} if hw.use_cpu or spec.dtype == "fp32" else {spec.dtype: True}
    return TrainingArguments(
        output_dir=str(run_dir / CHECKPOINTS), run_name=run.run_name, seed=sched.seed, use_cpu=hw.use_cpu,
        per_device_train_batch_size=sched.micro_batch_size, per_device_eval_batch_size=sched.micro_batch_size,
        gradient_accumulation_steps=sched.gradient_accumulation_steps, num_train_epochs=sched.epochs, max_steps=sched.max_steps,
        learning_rate=sched.learning_rate, lr_scheduler_type=sched.lr_scheduler, warmup_steps=sched.warmup_steps,
        weight_decay=sched.weight_decay, max_grad_norm=sched.max_grad_norm, optim=sched.optim,
        logging_steps=sched.logging_steps, save_strategy="steps", save_steps=sched.save_steps, save_total_limit=sched.save_total_limit,
        eval_strategy="steps" if with_eval else "no", eval_steps=sched.eval_steps,
        dataloader_num_workers=sched.dataloader_num_workers, dataloader_pin_memory=not hw.use_cpu,
        gradient_checkpointing=False,  # enabled on the model itself, before LoRA, where needed
        train_sampling_strategy="group_by_length" if run.profile.tokenize.group_by_length else "random", length_column_name="length",
        remove_unused_columns=False, report_to=report, disable_tqdm=True, torch_compile=sched.torch_compile,
        ddp_find_unused_parameters=False if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        deepspeed=str(run_dir / run.deepspeed) if run.deepspeed else None, **precision,
    )


def train_from(trainer, model, resume: Path | None, preempt, run_dir: Path) -> tuple[int, list, dict] | int:
    """(global step, log history, trainer metrics) of the run: trained from ``resume`` (or step 0), or taken from ``resume``
    when it is already the last step. An exit status instead when a guard tripped or the run was preempted."""
    last = final_state(resume)
    if last is not None:
        # The newest checkpoint is the run's last step, so its weights are the result (resuming there would train a step more).
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        say(f"{resume.name} is the last step of the run; saving its adapter")
        set_peft_model_state_dict(model, load_file(str(resume / "adapter_model.safetensors")))
        return last["global_step"], last["log_history"], {}
    say(f"resuming from {resume.name}" if resume else "starting from step 0")
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except GuardTripped as e:
        say(f"GUARD: {e}")
        if rank() == 0:
            _store.write_model(run_dir / TRAIN_RESULT_FILE, TrainResult(status="failed_guard", reason=str(e), global_step=trainer.state.global_step,
                                                                        log_history=trainer.state.log_history))
        return EXIT_GUARD
    if preempt.requested:
        if rank() == 0:
            _store.write_model(run_dir / TRAIN_RESULT_FILE, TrainResult(status="preempted", global_step=trainer.state.global_step))
        return EXIT_PREEMPTED
    return trainer.state.global_step, trainer.state.log_history, result.metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Culbot LoRA training entrypoint")
    ap.add_argument("--config", type=Path, required=True, help="The run's config.json, written by `culbot train`.")
    ap.add_argument("--local_rank", type=int, default=-1, help="Set by the deepspeed launcher.")
    args = ap.parse_args(argv)
    # Warnings and library log records as "LEVEL logger: message" lines, which the train stage logs at their level;
    # the known harmless ones dropped (tasks/quiet.py).
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet()
    run = _store.read_model(args.config, RunConfig)
    run_dir = args.config.resolve().parent
    ckpt_dir = run_dir / CHECKPOINTS

    from transformers import AutoConfig, AutoTokenizer, PrinterCallback, Trainer, set_seed

    from culbot.tasks.model_io import check_eos
    from culbot.tasks.special_tokens import special_tokens

    prof = run.profile
    base, revision = run.base_location(run_dir), run.card.base.revision
    set_seed(prof.train.seed)  # before LoRA init, which draws random A matrices; the Trainer seeds only later
    tokenizer = AutoTokenizer.from_pretrained(base, revision=revision)
    base_config = AutoConfig.from_pretrained(base, revision=revision)
    if any(t.kind != "chat" for t in run.card.templates.templates.values()):
        check_eos(tokenizer, base_config)
    serving = run.card.templates.for_source(prof.answer.source)
    tokens = {name: special_tokens(tokenizer, t, base_config.model_type) for name, t in run.card.templates.templates.items()}
    model = load_model(prof.model, base, revision, prof.hardware.use_cpu)
    # The adapter's own files (adapter_config.json, README.md) name the base as peft finds it here: make
    # that the Hub id, or the name the profile gave, never a path of this machine.
    model.config.name_or_path = model.name_or_path = run.card.base.name
    model, targets = apply_lora(model, prof.lora)

    train_ds, eval_ds, collator, packing = training_data(run, run_dir, tokenizer.pad_token_id)
    targs = training_arguments(run, run_dir, with_eval=len(eval_ds) > 0)
    say("batches: " + ("packed rows" if packing else "length-grouped (LengthGroupedSampler)" if prof.tokenize.group_by_length
                       else "random, padded to the longest")
        + f", micro {prof.train.micro_batch_size} x accumulation {prof.train.gradient_accumulation_steps}")
    guard, preempt, marker, lines = make_callbacks(prof.guards, ckpt_dir, run_dir)
    trainer = Trainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=eval_ds if len(eval_ds) else None,
                      data_collator=collator, processing_class=tokenizer, callbacks=[guard, preempt, marker, lines])
    trainer.remove_callback(PrinterCallback)  # LogLines prints the same logs as parseable JSON
    resume = newest_complete_checkpoint(ckpt_dir)
    t0 = time.time()
    trained = train_from(trainer, model, resume, preempt, run_dir)
    if isinstance(trained, int):
        return trained
    step, history, trainer_metrics = trained
    if not trainer.is_world_process_zero():
        return 0
    adapter = run_dir / ADAPTER
    trainer.model.save_pretrained(adapter)
    # The training prompt as the tokenizer's chat template: apply_chat_template, vLLM and TGI render it exactly.
    example = render_prompt(serving, EXAMPLE_QUESTION, "", tokenizer)
    install_chat_templates(tokenizer, run.card.templates, prof.answer.source)
    tokenizer.save_pretrained(adapter)   # with the pad token chosen above
    stops = sorted({i for t in tokens.values() for i in t.stop_ids})
    generation_config(model.get_base_model(), tokenizer, stops).save_pretrained(adapter)
    resumed_step = int(resume.name.split("-")[1]) if resume else 0
    metrics = run_metrics(trainer_metrics, history, resumed_step, step)
    card = run.card.model_copy(update={"base": run.card.base.relocated(run_dir, adapter), "lora_targets": targets,
                                       "special_tokens": tokens[serving.name], "prompt_example": example,
                                       "model_type": base_config.model_type,
                                       "train_metrics": metrics, "global_step": step, "resumed_from": resume.name if resume else None})
    _store.write_model(adapter / RUN_CARD_FILE, card)
    _store.write_model(run_dir / TRAIN_RESULT_FILE, TrainResult(
        status="completed", metrics=metrics, seconds=time.time() - t0, global_step=step, packing=packing, log_history=history,
        resumed_from=resume.name if resume else None))
    say(f"done: {step} steps, train loss {metrics.get('train_loss'):.4f}; adapter at {adapter}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
