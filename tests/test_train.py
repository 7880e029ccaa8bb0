"""Training on CPU with the tiny GPT-NeoX: the real Trainer, peft, torchrun, DeepSpeed and bitsandbytes."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from culbot.pipeline_config.train_schema import Guards
from culbot.tasks import _store
from culbot.tasks.contracts import PackingStats, RunCard, RunConfig, TrainResult
from culbot.tasks.run_folder import read_config
from culbot.tasks.loss_curve import curve_points, plot
from culbot.tasks.train import GuardFailure, TrainingFailed, curve_markdown, launch_command, run_training
from culbot.tasks.train_entry import EXIT_PREEMPTED, MARKER, GuardTripped, make_callbacks, newest_complete_checkpoint
from tests.conftest import prepare_tiny_run


def _run(tmp_path, sample_tokenized, tiny_model, *overrides):
    return prepare_tiny_run(tmp_path, sample_tokenized, tiny_model, *overrides)


def _losses(result):
    return [(h["step"], round(h["loss"], 6)) for h in result.log_history if "loss" in h]


def test_tiny_training_writes_exactly_these_files(tmp_path, sample_tokenized, tiny_model):
    prof, cfg = _run(tmp_path, sample_tokenized, tiny_model, "train.max_steps=6", "train.save_steps=3", "train.eval_steps=3")
    assert launch_command(prof, cfg) == [sys.executable, "-m", "culbot.tasks.train_entry", "--config", str(cfg)]
    result = run_training(cfg, prof)
    run = cfg.parent
    assert result.status == "completed" and result.global_step == 6
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    ckpt = ["README.md", "adapter_config.json", "adapter_model.safetensors", MARKER, "optimizer.pt", "rng_state.pth", "scheduler.pt",
            "tokenizer.json", "tokenizer_config.json", "trainer_state.json", "training_args.bin"]
    card = _store.read_model(run / "adapter" / "culbot.json", RunCard)
    # the training prompt as chat templates: the serving one (default) and one per template trained with
    chat = ["adapter/chat_template.jinja"] + [f"adapter/additional_chat_templates/{n}.jinja" for n in card.templates.templates]
    assert files == sorted(
        ["config.json", "train_result.json", "loss_curve.png",
         "adapter/README.md", "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/culbot.json", "adapter/tokenizer.json",
         "adapter/manifest.json", "adapter/tokenizer_config.json", "adapter/generation_config.json"] + chat
        + [f"checkpoints/checkpoint-{n}/{f}" for n in (3, 6) for f in ckpt])
    assert card.base.name == "culbot:tiny" and card.profile == "cpu-tiny"
    assert card.base.location(run / "adapter") == str(tiny_model)   # a path relative to the adapter: no path of this machine
    assert card.template_for("kullm").prompt_no_input.startswith("아래는 작업을 설명하는 명령어입니다.")
    assert card.hyperparameters.lora.r == 8 and card.lora_targets == ["query_key_value"]
    assert card.lineage.tokenized and card.lineage.formatted and card.lineage.dataset
    assert sum(card.data_mix["train"].values()) == card.token_counts.train.kept
    # peft's own files name the base by its portable name
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "culbot:tiny"
    assert str(tiny_model) not in (run / "adapter" / "README.md").read_text()
    # the run config holds paths relative to the run folder
    assert not Path(read_config(run).data).is_absolute() and str(run.parent.parent) not in cfg.read_text()
    # a rerun of a completed run returns at once
    t0 = time.monotonic()
    assert run_training(cfg, prof).global_step == 6 and time.monotonic() - t0 < 1


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path, sample_tokenized, tiny_model):
    prof, cfg = _run(tmp_path / "a", sample_tokenized, tiny_model, "train.max_steps=8", "train.save_steps=4", "train.logging_steps=1",
                     "train.save_total_limit=5")
    full = run_training(cfg, prof)
    # B: same config, holding only A's checkpoint-4 plus a half-written checkpoint-6 that must be skipped.
    b = tmp_path / "b"
    shutil.copytree(cfg.parent / "checkpoints" / "checkpoint-4", b / "checkpoints" / "checkpoint-4")
    (b / "checkpoints" / "checkpoint-6").mkdir()
    (b / "checkpoints" / "checkpoint-6" / "trainer_state.json").write_text("{ half")
    conf = _store.read_model(cfg, RunConfig)
    _store.write_model(b / "config.json", conf.model_copy(update={
        "data": os.path.relpath(conf.data_dir(cfg.parent), b), "card": conf.card.model_copy(update={"base": conf.card.base.relocated(cfg.parent, b)})}))
    lines = []
    resumed = run_training(b / "config.json", prof, on_line=lines.append)
    assert any("resuming from checkpoint-4" in l for l in lines)
    assert any("skipping incomplete or corrupt checkpoint checkpoint-6" in l for l in lines)
    tail = [x for x in _losses(full) if x[0] > 4]
    assert len(tail) == 4
    assert [x for x in _losses(resumed) if x[0] > 4] == tail


def test_sigterm_saves_a_checkpoint_and_exits_preempted(tmp_path, sample_tokenized, tiny_model):
    prof, cfg = _run(tmp_path, sample_tokenized, tiny_model, "train.max_steps=400", "train.save_steps=1000", "train.logging_steps=1",
                     "train.eval_steps=1000")
    proc = subprocess.Popen(launch_command(prof, cfg), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("culbot-log ") and json.loads(line[11:])["step"] >= 3:
            proc.send_signal(signal.SIGTERM)
            break
    proc.stdout.read()
    assert proc.wait(timeout=120) == EXIT_PREEMPTED
    ckpt = newest_complete_checkpoint(cfg.parent / "checkpoints")
    assert ckpt is not None and 3 <= int(ckpt.name.split("-")[1]) < 400
    assert _store.read_model(cfg.parent / "train_result.json", TrainResult).status == "preempted"


def test_collapse_guard_stops_the_run_and_marks_it_failed(tmp_path, sample_tokenized, tiny_model):
    # real losses (~6.9) sit under a threshold of 100: the collapse guard must fire after 2 logs
    prof, cfg = _run(tmp_path, sample_tokenized, tiny_model, "train.max_steps=20", "train.logging_steps=1",
                     "guards.collapse_below=100", "guards.collapse_logs=2")
    with pytest.raises(GuardFailure, match="can never be published"):
        run_training(cfg, prof)
    res = _store.read_model(cfg.parent / "train_result.json", TrainResult)
    assert res.status == "failed_guard" and "loss collapsed: 2 consecutive logs" in res.reason
    assert not (cfg.parent / "adapter").exists()


class _State:
    global_step = 7
    is_world_process_zero = True


def test_guard_fires_on_an_injected_nan_loss_and_on_exploding_gradients(tmp_path):
    guards = Guards(collapse_below=0.02, collapse_logs=3, grad_norm_limit=100.0)
    guard = make_callbacks(guards, tmp_path, tmp_path)[0]
    guard.on_log(None, _State(), None, logs={"loss": 1.2, "grad_norm": 3.0})
    with pytest.raises(GuardTripped, match="loss is nan at step 7"):
        guard.on_log(None, _State(), None, logs={"loss": float("nan")})
    with pytest.raises(GuardTripped, match="grad norm 1000.0 exceeds 100.0"):
        guard.on_log(None, _State(), None, logs={"loss": 1.0, "grad_norm": 1000.0})
    g2 = make_callbacks(guards, tmp_path, tmp_path)[0]
    for _ in range(2):
        g2.on_log(None, _State(), None, logs={"loss": 0.001})
    with pytest.raises(GuardTripped, match="collapsed"):
        g2.on_log(None, _State(), None, logs={"loss": 0.001})


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path, sample_tokenized, tiny_model):
    prof, cfg = _run(tmp_path, sample_tokenized, tiny_model, "hardware.gpus=2", "hardware.launcher=torchrun",
                     "train.global_batch_size=16", "train.max_steps=4", "train.save_steps=4")
    assert launch_command(prof, cfg)[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    result = run_training(cfg, prof)
    assert result.status == "completed" and result.global_step == 4
    assert (cfg.parent / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_deepspeed_zero2_under_torchrun_two_processes(tmp_path, sample_tokenized, tiny_model):
    prof, cfg = _run(tmp_path, sample_tokenized, tiny_model, "hardware.gpus=2", "hardware.launcher=torchrun", "deepspeed=zero2.json",
                     "train.global_batch_size=16", "train.max_steps=3", "train.save_steps=3")
    lines = []
    env = {"TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "torch_extensions")}
    try:
        result = run_training(cfg, prof, on_line=lines.append, env=env)
    except TrainingFailed as e:
        # Once in four full-suite runs a rank aborted (exit -6) with no message of its own; alone and under CPU load it
        # passed every time. One retry, with every rank's output of the failure printed for whoever looks next.
        print("\n".join(lines))
        assert "exitcode  : -6" in str(e), str(e)[-3000:]
        lines.clear()
        result = run_training(cfg, prof, on_line=lines.append, env=env)
    assert result.status == "completed" and result.global_step == 3
    assert any("DeepSpeed" in l or "deepspeed" in l for l in lines)
    assert read_config(cfg.parent).deepspeed == "deepspeed.json" and (cfg.parent / "deepspeed.json").is_file()   # travels with the run
    assert (cfg.parent / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_qlora_4bit_step_on_cpu(tmp_path, sample_tokenized, tiny_model):
    prof, cfg = _run(tmp_path, sample_tokenized, tiny_model, "model.quantization=4bit", "model.bnb_4bit_compute_dtype=fp32",
                     "train.max_steps=2", "train.save_steps=2")
    lines = []
    result = run_training(cfg, prof, on_line=lines.append)
    assert result.status == "completed" and result.global_step == 2


def test_packed_training_twice_gives_the_same_adapter(tmp_path, sample_tokenized, tiny_model):
    from safetensors.torch import load_file

    runs = []
    for name in ("a", "b"):
        prof, cfg = _run(tmp_path / name, sample_tokenized, tiny_model, "tokenize.packing=true", "train.max_steps=3", "train.save_steps=3")
        result = run_training(cfg, prof)
        assert result.status == "completed" and result.global_step == 3
        assert all(h["loss"] == h["loss"] for h in result.log_history if "loss" in h)   # finite losses
        packed = result.packing
        cutoff = prof.tokenize.cutoff_len
        assert packed.rows < packed.examples and packed.max_len == cutoff
        assert packed.tokens <= packed.rows * cutoff and packed.real_token_share > 0.9
        runs.append(load_file(str(cfg.parent / "adapter" / "adapter_model.safetensors")))
    assert runs[0].keys() == runs[1].keys()
    assert all((runs[0][k] == runs[1][k]).all() for k in runs[0])


def test_length_grouped_training_uses_the_length_sampler(tmp_path, sample_tokenized, tiny_model):
    prof, cfg = _run(tmp_path, sample_tokenized, tiny_model, "tokenize.packing=false", "tokenize.group_by_length=true", "train.max_steps=2", "train.save_steps=2")
    lines = []
    result = run_training(cfg, prof, on_line=lines.append)
    assert result.status == "completed" and result.global_step == 2
    assert any("batches: length-grouped" in l for l in lines), lines[-20:]


@pytest.mark.slow
def test_wandb_runs_offline_without_a_key(tmp_path, sample_tokenized, tiny_model, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    prof, cfg = _run(tmp_path, sample_tokenized, tiny_model, "train.report_to=auto", "train.max_steps=2", "train.save_steps=2")
    result = run_training(cfg, prof, env={"WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"})
    assert result.status == "completed"
    assert list((tmp_path / "wandb").glob("offline-run-*")), "expected an offline W&B run"


def test_training_curve_artifact_states_the_packing_and_links_the_png(tmp_path):
    result = TrainResult(status="completed", global_step=4, metrics={"train_loss": 6.5},
                         packing=PackingStats(examples=56, rows=17, max_len=256, tokens=4000, real_token_share=0.919, examples_per_row=3.29),
                         log_history=[{"step": 2, "loss": 6.9, "learning_rate": 1e-4}, {"step": 4, "loss": 6.5, "learning_rate": 5e-5},
                                      {"step": 4, "eval_loss": 6.7}, {"step": 4, "train_loss": 6.6, "train_runtime": 3.0}])
    md = curve_markdown(result, tmp_path / "cpu-tiny-abc", "/x/loss_curve.png")
    assert md.splitlines()[:7] == ["# Training `cpu-tiny-abc`", "", "4 optimizer steps, train loss 6.5000, last eval loss 6.7000", "",
                                   "Packed 56 examples into 17 rows of up to 256 tokens: 91.9% real tokens, 3.29 examples per row.", "",
                                   "Loss curve (train and eval loss, learning rate): `/x/loss_curve.png`"]   # no file:// link the UI cannot open
    assert "[loss_curve.png](https://h/x.png)" in curve_markdown(result, tmp_path / "cpu-tiny-abc", "https://h/x.png")
    # the table artifact's rows: one per step, eval loss and learning rate on the step that logged them
    assert curve_points(result) == [{"step": 2, "loss": 6.9, "eval_loss": None, "learning_rate": 1e-4},
                                    {"step": 4, "loss": 6.5, "eval_loss": 6.7, "learning_rate": 5e-5}]
    png = plot(result, tmp_path / "loss_curve.png", "cpu-tiny-abc")
    from PIL import Image

    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (770, 396)
        colours = {c for _, c in im.convert("RGB").getcolors(maxcolors=100_000)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours   # the train (blue) and eval (orange) lines are drawn
    # the picture itself rides in the artifact (the Prefect UI cannot reach the run folder's file)
    import base64

    md = curve_markdown(result, tmp_path / "cpu-tiny-abc", "/x/loss_curve.png", png.read_bytes())
    inline = [line for line in md.splitlines() if line.startswith("![loss curve](data:image/png;base64,")]
    assert len(inline) == 1 and base64.b64decode(inline[0].split(",", 1)[1].rstrip(")")) == png.read_bytes()


def test_a_deleted_adapter_rebuilt_from_the_last_checkpoint_keeps_the_metrics_of_its_run(tmp_path, sample_tokenized, tiny_model):
    prof, cfg = _run(tmp_path, sample_tokenized, tiny_model, "train.max_steps=4", "train.save_steps=4", "train.logging_steps=1")
    from safetensors.torch import load_file

    first = run_training(cfg, prof)
    weights = load_file(str(cfg.parent / "adapter" / "adapter_model.safetensors"))
    shutil.rmtree(cfg.parent / "adapter")
    again = run_training(cfg, prof)   # checkpoint-4 is the last step: its weights are the adapter, no step is trained
    assert again.status == "completed" and again.global_step == 4 and again.resumed_from == "checkpoint-4"
    rebuilt = load_file(str(cfg.parent / "adapter" / "adapter_model.safetensors"))
    assert rebuilt.keys() == weights.keys() and all((rebuilt[k] == weights[k]).all() for k in weights)
    assert again.metrics["carried_over_from"] == "checkpoint-4" and again.metrics["steps_this_process"] == 0
    assert again.metrics["train_loss"] == pytest.approx(first.metrics["train_loss"], rel=1e-6)   # not 0.0
    card = _store.read_model(cfg.parent / "adapter" / "culbot.json", RunCard)
    assert card.train_metrics == again.metrics and card.resumed_from == "checkpoint-4"


def test_the_entrypoint_refuses_a_run_config_of_another_version(tmp_path, sample_tokenized, tiny_model):
    from culbot.tasks.train_entry import main

    _, cfg = _run(tmp_path, sample_tokenized, tiny_model, "train.max_steps=1")
    (cfg.parent / "config.json").write_text(json.dumps({**json.loads(cfg.read_text()), "version": 7}))
    with pytest.raises(ValueError, match=r"config.json: not a valid RunConfig.*RunConfig version 7 is not the version 1"):
        main(["--config", str(cfg)])


def test_a_checkpoint_with_truncated_files_is_skipped_and_training_resumes_from_the_one_before(tmp_path, sample_tokenized, tiny_model):
    prof, cfg = _run(tmp_path, sample_tokenized, tiny_model, "train.max_steps=8", "train.save_steps=4", "train.logging_steps=1",
                     "train.save_total_limit=5")
    run_training(cfg, prof)
    ckpt = cfg.parent / "checkpoints"
    shutil.rmtree(cfg.parent / "adapter")                                      # force a rerun
    weights = ckpt / "checkpoint-8" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])                            # truncated after its marker was written
    lines = []
    result = run_training(cfg, prof, on_line=lines.append)
    assert result.status == "completed" and result.global_step == 8 and result.resumed_from == "checkpoint-4"
    skipped = [l for l in lines if "skipping incomplete or corrupt checkpoint checkpoint-8" in l]
    assert skipped and "adapter_model.safetensors" in skipped[0] and "size" in skipped[0]


def test_trainer_lines_give_elapsed_time_and_eta_and_keep_levels(caplog):
    """Issue 22: step lines had no elapsed time or ETA; warnings, blank lines and `warnings.warn(` fragments reached the run
    logs as INFO."""
    import json
    import logging

    from culbot.tasks.train import TrainerLines

    now = [100.0]
    lines = TrainerLines(clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="culbot.train")
    now[0] = 130.0   # 30 s of model loading
    lines("[culbot.train] starting from step 0")
    lines("")
    now[0] = 150.0
    lines("culbot-log " + json.dumps({"step": 10, "max_steps": 40, "loss": 2.5, "grad_norm": 0.3, "learning_rate": 1e-4}))
    lines("WARNING culbot.warnings: UserWarning: something real (x.py:3)")
    got = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert got == [("INFO", "starting from step 0"),
                   ("INFO", "step 10/40  loss 2.5000  grad norm 0.3  lr 0.0001  (elapsed 0:00:50, ETA 0:01:00)"),
                   ("WARNING", "culbot.warnings: UserWarning: something real (x.py:3)")]


def test_the_known_library_noise_is_dropped_and_other_warnings_are_one_line(capfd):
    import subprocess
    import sys

    code = ("import logging; logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s'); "
            "from culbot.tasks.quiet import quiet; quiet(); import warnings, deepspeed, bitsandbytes, peft; "
            "warnings.warn('Could not find a config file in culbot:tiny - will assume'); warnings.warn('x', FutureWarning); "
            "warnings.warn('a real one')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    out = [line for line in (r.stdout + r.stderr).splitlines()]
    assert r.returncode == 0 and out == ["WARNING culbot.warnings: UserWarning: a real one (<string>:1)"], out


@pytest.mark.slow
def test_an_invalid_wandb_key_logs_offline_with_one_warning(tmp_path, sample_tokenized, tiny_model, monkeypatch):
    """Issue 22: report_to=auto with a WANDB_API_KEY that W&B refuses ended training with a wandb traceback and exit 1.
    A local server stands in for W&B and refuses every key as api.wandb.ai does (401)."""
    import json as _json
    from http.server import BaseHTTPRequestHandler

    from tests.servers.base import serve

    class Refuses(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = _json.dumps({"errors": [{"message": "user is not logged in"}]}).encode()
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST

        def log_message(self, *a):
            pass

    monkeypatch.delenv("WANDB_MODE", raising=False)
    key = "local" + "0" * 35
    prof, cfg = _run(tmp_path, sample_tokenized, tiny_model, "train.report_to=auto", "train.max_steps=2", "train.save_steps=2")
    lines = []
    with serve(Refuses, None) as url:
        result = run_training(cfg, prof, on_line=lines.append, env={"WANDB_API_KEY": key, "WANDB_BASE_URL": url, "WANDB_DIR": str(tmp_path),
                                                                    "WANDB_SILENT": "true"})
    assert result.status == "completed"
    warned = [line for line in lines if "W&B did not accept WANDB_API_KEY" in line]
    assert len(warned) == 1 and warned[0].startswith("WARNING culbot.train: ") and key not in "\n".join(lines), lines[-20:]
    assert list((tmp_path / "wandb").glob("offline-run-*"))
