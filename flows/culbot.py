"""The `culbot` flow: data refresh -> train -> eval gate -> merge -> publish.

Run as: culbot run full [--profile sample] [--train-profile cpu-tiny] [--set ...] [--train-set ...] [--force]

With the defaults it is the embedded end-to-end run: shipped samples, the tiny
GPT-NeoX on CPU, and a local publish folder, with no keys and no network.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger

from culbot.flows.data_refresh import data_refresh, ref, run_stage
from culbot.pipeline_config.train_schema import load_train_profile
from culbot.tasks.release_tasks import eval_task, merge_adapter_task, publish_task, train_task


class EvalGateFailed(RuntimeError):
    """The trained model did not pass eval; nothing is merged or published."""


Stage = Literal["format", "train", "eval", "merge", "publish"]


@flow(name="culbot", flow_run_name="culbot-{profile}-{train_profile}-to-{to_stage}")
def culbot(profile: str = "sample", train_profile: str = "cpu-tiny", overrides: list[str] | None = None,
           train_overrides: list[str] | None = None, to_stage: Stage = "publish", force: bool = False) -> dict:
    """The whole chain, or its beginning up to `to_stage`.

    Args:
        profile: data profile (pipeline_config/<name>.yaml or a path).
        train_profile: training profile (pipeline_config/profiles/<name>.yaml or a path): a6000x4, runpod-a100x2, gcp-l4, cpu-tiny.
        overrides: `section.field=value` settings for the data profile.
        train_overrides: `section.field=value` settings for the training profile (e.g. publish.target=hub).
        to_stage: last stage to run: format (the data refresh only), train, eval, merge or publish.
        force: ignore every cache and rebuild each stage (training still resumes from its checkpoints).
    """
    log = get_run_logger()
    tp = load_train_profile(train_profile, train_overrides or [])
    data = data_refresh(profile=profile, overrides=overrides, force=force)
    result: dict = {"data": data, "run": None, "eval": None, "model": None, "publish": None}
    if to_stage == "format":
        return result
    run = result["run"] = run_stage(train_task, force, profile=tp.model_dump(mode="json"), formatted=ref(data["formatted"]))
    run_ref = {**ref(run), "run_dir": run["run_dir"]}
    if to_stage == "train":
        return result
    ev = result["eval"] = run_stage(eval_task, force, run=run_ref, spec=tp.eval.model_dump(mode="json"))
    if ev["counts"]["status"] != "passed":
        raise EvalGateFailed(f"eval gate failed for {run['run_dir']}: validation loss {ev['counts']['eval_loss']}; not merging or publishing")
    if to_stage == "eval":
        return result
    model = None
    if tp.publish.what in ("merged", "both") or to_stage == "merge":
        model = result["model"] = run_stage(merge_adapter_task, force, run=run_ref, spec=tp.merge.model_dump(mode="json"),
                          models_root=str(Path(tp.artifacts_root).resolve() / "models"), probes=tp.eval.probes)
    if to_stage == "merge":
        return result
    pub = result["publish"] = run_stage(publish_task, force, run=run_ref, model=ref(model) if model else None, spec=tp.publish.model_dump(mode="json"),
                    evaluation=ref(ev))
    log.info("run %s: eval loss %.4f; published %s", Path(run["run_dir"]).name, ev["counts"]["eval_loss"], pub["path"])
    return result
