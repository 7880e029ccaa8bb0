"""Publish the merged model and/or the adapter, with a model card: the Hugging Face Hub, or a local folder.

Run as: culbot publish --run artifacts/runs/<run> --model artifacts/models/<hash> [--target hub --repo-id ORG/NAME]

Publishing is refused unless training completed (no guard fired) and eval passed. The
card is written from the run card and the eval report. The Hub token comes only from
HF_TOKEN or a Prefect Secret block; it is never written to the card, the logs or the
publish record.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

from huggingface_hub import ModelCard

from culbot.pipeline_config.train_schema import PublishConfig

from . import _store
from ._prefect import retry_on_network, stage_task
from .contracts import Stage, EVAL_REPORT_FILE, RUN_CARD_FILE, ContextFormat, Contract, EvalReport, PublishOutput, Release, RunCard, RunRef, StageRef, short_hash
from .releases import RELEASE_FILE, PublishRefused, hub_token, record_release, release_of
from .run_folder import ADAPTER, EVAL, PUBLISH, read_run_card, require_completed
from .templates import EXAMPLE_QUESTION, render_context, render_prompt

log = logging.getLogger("culbot.publish")

RECORD = "record.json"


class Published(Contract):
    where: str                 # the Hub URL or the local folder
    repo: str | None = None
    commit: str | None = None


class PublishRecord(Contract):
    """``<run>/publish/record.json``: what was published where (never a token)."""

    target: str
    run: str
    dataset: str | None
    published: dict[str, Published]
    folder: str | None = None  # target local: the folder published into (as configured), verified like any stage output
    at: str


def check_publishable(run_dir: Path) -> EvalReport:
    run_dir = Path(run_dir)
    require_completed(run_dir)
    ev = run_dir / EVAL / EVAL_REPORT_FILE
    if not ev.is_file():
        raise PublishRefused(f"{run_dir.name}: no eval report; run `culbot eval --run {run_dir}` first")
    evaluation = _store.read_model(ev, EvalReport)
    if not evaluation.passed:
        raise PublishRefused(f"{run_dir.name}: eval gate failed ({evaluation.reason})")
    return evaluation


def architecture_tags(card: RunCard) -> list[str]:
    """The base architecture's tags (pipeline_config/models/families.yaml), from the model_type training read."""
    if not card.model_type:
        return []
    from culbot.pipeline_config.model_schema import families

    fam = families().get(card.model_type)
    return fam.tags if fam else [card.model_type]


def _hyperparameter_rows(card: RunCard) -> str:
    hp = card.hyperparameters
    return "\n".join(f"| {k} | {v} |" for k, v in [
        ("LoRA r / alpha / dropout", f"{hp.lora.r} / {hp.lora.alpha} / {hp.lora.dropout}"),
        ("LoRA targets", ", ".join(card.lora_targets)),
        ("micro batch × accumulation → global", f"{hp.train.micro_batch_size} × {hp.train.gradient_accumulation_steps} → {hp.train.global_batch_size}"),
        ("epochs / max steps", f"{hp.train.epochs} / {hp.train.max_steps}"),
        ("learning rate / schedule / warmup", f"{hp.train.learning_rate} / {hp.train.lr_scheduler} / {hp.train.warmup_steps}"),
        ("cutoff / train on inputs / packing", f"{hp.tokenize.cutoff_len} / {hp.tokenize.train_on_inputs} / {hp.tokenize.packing}"),
        ("dtype / quantisation", f"{hp.model.dtype} / {hp.model.quantization}"),
        ("optimizer steps", card.global_step)])


def _prompt_section(card: RunCard, t) -> str:
    """The template exactly as trained, how retrieved passages go in, and an example prompt."""
    ctx = card.templates.context
    if t.kind == "alpaca":
        example_ctx = render_context([("생활관 입사 안내", "신입생 입사 신청은 합격자 발표 후 생활관 홈페이지에서 받습니다.")], ctx or ContextFormat())
        example = render_prompt(t, EXAMPLE_QUESTION, example_ctx if ctx else "")
        example_block = ("\nA student's question with one retrieved passage, exactly as the model was trained and evaluated:\n\n"
                         f"```\n{example}\n```\n")
        template_block = f"```\n{t.prompt_no_input}\n```"
    else:
        example_block = ""
        template_block = (f"The tokenizer's own chat template with this system persona (used when a conversation brings none):\n\n"
                          f"> {t.system}\n\nA student's question, rendered exactly as in training:\n\n```\n{card.prompt_example}\n```")
    context = ""
    if ctx is not None:
        shown = [json.dumps(x, ensure_ascii=False) for x in (ctx.passage, ctx.joiner)]   # newlines as \n
        context = (f"\nWith retrieval, put the retrieved passages in `input`, each as `{shown[0][1:-1]}`, joined by `{shown[1][1:-1]}`; "
                   f"the instruction is the student's question.\nIn training, {', '.join(ctx.sources)} rows had {ctx.k} passages "
                   f"(the source passage and {ctx.k - 1} retrieved distractors, shuffled); {ctx.no_context_share:.0%} had none.\n")
    return f"{template_block}\n{context}{example_block}"


def _generation_section(spec, tokens, t) -> str:
    """How answers are decoded and when Culbot refuses instead."""
    decoding = "greedy" if not spec or not spec.do_sample else f"sampling (temperature {spec.temperature}, top_p {spec.top_p})"
    end = f"`{tokens.end_token}`" if tokens else "the tokenizer's EOS"
    if t.kind == "alpaca":
        end += " or the template's next section header"
    threshold = spec.no_answer_threshold if spec and spec.no_answer_threshold is not None else \
        "the index's own threshold (calibrated when it is built)"
    return (f"Generation: {decoding}, at most {spec.max_new_tokens if spec else 256} new tokens,\n"
            f"repetition penalty {spec.repetition_penalty if spec else 1.1}; the answer ends at {end}.\n"
            "When the retrieval confidence (the idf-weighted share of the question's words in the top document) is under\n"
            f"{threshold}, Culbot does not generate:\nit says it does not know and names the office to ask.")


def _evaluation_section(evaluation: EvalReport) -> str:
    ret = evaluation.retrieval
    retrieval = "" if ret is None else (f"Retrieval over the CBNU documents ({ret.questions} questions): recall@1 **{ret.recall_at_1:.3f}**, "
                                        f"recall@5 **{ret.recall_at_5:.3f}**, MRR **{ret.mrr:.3f}**.\n")
    index = (f"Evaluated with the retrieval index `artifacts/indexes/{evaluation.index_name}` (content hash `{evaluation.index}`); "
             "serve with the same index.\n") if evaluation.index else ""
    quality = ""
    if evaluation.answers is not None:
        from .answer_quality import markdown as answer_markdown

        quality = "\n".join(answer_markdown(evaluation.answers, examples=3)[2:]) + "\n"
    probe = evaluation.probes[0] if evaluation.probes else None
    example = f"Example: **Q:** {probe.question} **A:** {probe.answer or '(empty)'}" if probe else ""
    return (f"Validation loss **{evaluation.eval_loss:.4f}**, perplexity **{evaluation.perplexity:.2f}** ({evaluation.status}: {evaluation.reason}).\n"
            f"{retrieval}{index}{quality}{example}")


def _usage(kind: str, repo_name: str, stops: list[int] | None) -> str:
    load = ("from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n"
            f"model = AutoPeftModelForCausalLM.from_pretrained(\"{repo_name}\")") if kind == "adapter" \
        else f"from transformers import AutoModelForCausalLM, AutoTokenizer\nmodel = AutoModelForCausalLM.from_pretrained(\"{repo_name}\")"
    return (f"{load}\ntokenizer = AutoTokenizer.from_pretrained(\"{repo_name}\")\n"
            "# The tokenizer's chat template is the training prompt; retrieved passages go in `documents`.\n"
            "prompt = tokenizer.apply_chat_template([{\"role\": \"user\", \"content\": \"기숙사 신청은 언제 해요?\"}],\n"
            "                                       documents=[{\"title\": \"생활관 입사 안내\", \"text\": \"...\"}], tokenize=False)\n"
            "inputs = tokenizer(prompt, return_tensors=\"pt\", add_special_tokens=False)\n"
            f"answer = model.generate(**inputs, max_new_tokens=200, eos_token_id={stops or 'tokenizer.eos_token_id'})")


def model_card(card: RunCard, evaluation: EvalReport, kind: str, repo_name: str, license: str) -> str:
    """README.md with Hub metadata: base model, data mix, template, hyperparameters, profile, eval, use and limits."""
    base, mix, spec, tokens = card.base, card.data_mix, evaluation.answer, card.special_tokens
    t = card.template_for(spec.source if spec is not None else "cbnu")
    rows = "\n".join(f"| {s} | {n} | {mix['validation'].get(s, 0)} |" for s, n in sorted(mix["train"].items()))
    folder = repo_name.split('/')[-1]
    index_dir = f"artifacts/indexes/{evaluation.index_name or '<index>'}"
    body = f"""# {repo_name}

A Korean campus assistant for Chungbuk National University (충북대학교, CBNU), built by the Culbot pipeline:
{'a LoRA adapter for' if kind == 'adapter' else 'LoRA fine-tuning merged into'} `{base.name}`{f" (revision `{base.revision}`)" if base.revision else ''}.

## Data

Dataset version `{short_hash(card.lineage.dataset or '')}` (KULLM-v2, QA generated from CBNU web pages, univ100 student Q&A).

| source | train rows | validation rows |
|---|---:|---:|
{rows}

## Prompt template `{t.name}`

Format prompts exactly like this (the templates are also saved as `templates.json`, and as the tokenizer's chat template):

{_prompt_section(card, t)}
## Chat with it

```bash
culbot chat --model ./{folder} --index {index_dir} --once "기숙사 신청은 언제 해요?"
culbot serve --model ./{folder} --index {index_dir} --port 8000   # OpenAI-compatible API
```

{_generation_section(spec, tokens, t)}

## Training

Profile `{card.profile}`.

| setting | value |
|---|---|
{_hyperparameter_rows(card)}

## Evaluation

{_evaluation_section(evaluation)}

## Use

```python
{_usage(kind, repo_name, tokens.stop_ids if tokens else None)}
```

## Intended use and limits

For answering questions about CBNU campus life, admissions and administration, in Korean. Part of the training data
was generated by a language model from university web pages and part is informal student advice from univ100; answers
can be outdated or wrong. Check official CBNU sources for anything that matters (deadlines, fees, requirements).
Not for medical, legal or financial advice.
"""
    return str(ModelCard(f"---\n{card_data(card, evaluation, kind, repo_name, license).to_yaml()}\n---\n\n{body}"))


def card_data(card: RunCard, evaluation: EvalReport, kind: str, repo_name: str, license: str):
    """The Hub metadata, validated by huggingface_hub's ModelCardData: eval results become model-index entries."""
    from huggingface_hub import EvalResult, ModelCardData

    dataset = f"Culbot validation split {short_hash(card.lineage.dataset or '')}"
    scores = [("loss", "validation loss", evaluation.eval_loss), ("perplexity", "validation perplexity", evaluation.perplexity)]
    if evaluation.retrieval is not None:
        scores += [("recall", "retrieval recall@5", evaluation.retrieval.recall_at_5)]
    if evaluation.answers is not None:
        m = evaluation.answers.metrics
        scores += [(k, f"answer {label}", getattr(m, k)) for k, label in (
            ("fact_recall", "fact recall"), ("chrf", "chrF"), ("groundedness", "groundedness"), ("refusal_rate", "refusal rate"),
            ("false_refusal_rate", "false refusal rate"))]
    results = [EvalResult(task_type="text-generation", task_name="Korean campus QA", dataset_type="culbot-validation", dataset_name=dataset,
                          metric_type=t, metric_name=name, metric_value=round(v, 4))
               for t, name, v in scores if v is not None and math.isfinite(v)]
    return ModelCardData(language=["ko"], license=license, library_name="peft" if kind == "adapter" else "transformers",
                         tags=["culbot", "cbnu", "korean", "lora", *architecture_tags(card)], datasets=["nlpai-lab/kullm-v2"],
                         pipeline_tag="text-generation", base_model=card.base.name if card.base.path is None else None,
                         model_name=repo_name, eval_results=results or None)


def _folders(spec: PublishConfig, run_dir: Path, model_dir: Path | None) -> dict[str, Path]:
    out = {}
    if spec.what in ("merged", "both"):
        if model_dir is None or not _store.is_complete(model_dir):
            raise PublishRefused(f"merged model {model_dir} is missing or does not verify; run `culbot merge-adapter` first")
        out["merged"] = Path(model_dir)
    if spec.what in ("adapter", "both"):
        out["adapter"] = Path(run_dir) / ADAPTER
    return out


def _copy_with_card(folder: Path, dest: Path, card_text: str, local_base: bool, release: Release) -> None:
    """The folder without its manifest, a README.md model card, the release (answer metrics, the gate's next baseline),
    and a run card whose local base still resolves (or is dropped)."""
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("manifest.json", ".*"))
    (dest / "README.md").write_text(card_text, encoding="utf-8")
    _store.write_model(dest / RELEASE_FILE, release)
    card = read_run_card(folder)
    base = card.base.relocated(folder, dest) if local_base else card.base.model_copy(update={"path": None})
    _store.write_model(dest / RUN_CARD_FILE, card.model_copy(update={"base": base}))


def run_publish(run_dir: Path, model_dir: Path | None, spec: PublishConfig) -> PublishRecord:
    run_dir = Path(run_dir).resolve()
    evaluation = check_publishable(run_dir)
    card = read_run_card(run_dir / ADAPTER)
    folders = _folders(spec, run_dir, model_dir)
    base_name = spec.repo_id or f"culbot-{card.profile}-{short_hash(card.lineage.dataset or '')}"
    names = {"merged": base_name, "adapter": f"{base_name}-lora"}
    root = None
    commit_message = f"culbot: dataset {short_hash(card.lineage.dataset or '')}, run {run_dir.name}"
    published: dict[str, Published] = {}
    if spec.target == "local":
        # One folder per run (its name holds the run id, a hash of data, base and settings): runs never share one.
        root = Path(spec.local_dir) / f"{(spec.repo_id or 'culbot').replace('/', '__')}-{run_dir.name}"
        staging = _store.new_staging_dir(root.parent, root.name)
        for kind, folder in folders.items():
            _copy_with_card(folder, staging / kind, model_card(card, evaluation, kind, names[kind], spec.license), local_base=True,
                            release=release_of(run_dir, card, evaluation, spec.target, {k: str(root / k) for k in folders}))
            published[kind] = Published(where=str(root / kind))
    else:
        from huggingface_hub import HfApi

        if not spec.repo_id:
            raise PublishRefused("publish.repo_id is required for target 'hub'")
        api = HfApi(endpoint=spec.endpoint, token=hub_token(spec))
        for kind, folder in folders.items():
            repo = names[kind]
            url = api.create_repo(repo, private=spec.private, exist_ok=True, repo_type="model")
            with tempfile.TemporaryDirectory() as tmp:
                upload = Path(tmp) / "upload"
                _copy_with_card(folder, upload, model_card(card, evaluation, kind, repo, spec.license), local_base=False,
                                release=release_of(run_dir, card, evaluation, spec.target, {kind: str(url)}))
                info = api.upload_folder(folder_path=str(upload), repo_id=repo, repo_type="model", commit_message=commit_message)
            if spec.tag:
                api.create_tag(repo, tag=spec.tag, revision=info.oid, repo_type="model")
            published[kind] = Published(where=str(url), repo=repo, commit=info.oid)
            log.info("published %s to %s (commit %s)", kind, url, info.oid[:10])
    record = PublishRecord(target=spec.target, run=run_dir.name, dataset=card.lineage.dataset, published=published,
                           folder=str(root) if root else None, at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    record_release(spec, release_of(run_dir, card, evaluation, spec.target, {k: p.where for k, p in published.items()}))
    # One output folder, one manifest: the published folder itself for a local target, else the run's publish/ record.
    out = staging if root else _store.reopen(run_dir / PUBLISH)
    _store.write_model(out / RECORD, record)
    _store.write_manifest(out, stage="publish", inputs={"adapter": _store.read_manifest(run_dir / ADAPTER).content_hash},
                          lineage=card.lineage, config=spec.model_dump(mode="json"), counts={"published": len(published)})
    if root:
        _store.promote(staging, root, replace=True)   # named by its run, not its content: a republish replaces it
    return record


STAGE = Stage(name="publish", module=__name__, profile="train", section="publish")


@stage_task(STAGE, retries=2, retry_delay_seconds=30, retry_condition_fn=retry_on_network)
def publish_task(spec: PublishConfig, run: RunRef, model: StageRef | None, evaluation: StageRef) -> PublishOutput:
    """Network stage for the Hub target: a network failure is retried. ``evaluation`` ties the cache to the eval verdict."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    rec = run_publish(run.run_dir, model.path if model else None, spec)
    for kind, p in rec.published.items():
        if p.repo:
            create_link_artifact(p.where, link_text=f"{kind}: {p.repo}", key=f"published-{kind}",
                                 description=f"The published {kind} model on the Hub ({p.repo}, commit {p.commit[:10] if p.commit else '?'})")
        else:
            create_markdown_artifact(f"# Published {kind}\n\n`{p.where}`\n", key=f"published-{kind}",
                                     description=f"Where the published {kind} model was written")
    # The output that a cache hit must verify: the published folder itself for a local target, else the record.
    out = Path(rec.folder) if rec.folder else run.run_dir / PUBLISH
    m = _store.read_manifest(out)
    return PublishOutput(path=out.resolve(), content_hash=m.content_hash, stage="publish", counts=m.counts,
                         published={k: p.where for k, p in rec.published.items()})
