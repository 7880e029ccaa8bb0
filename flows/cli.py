"""The `culbot` command, declared as a table: one :class:`Command` per subcommand.

A command names what it does, the profile it reads (data or training), the config fields its
flags set and the function that runs it. A flag bound to a field takes its type, choices and
help from the pydantic field, and its value reaches the config loader as that field's value,
so an error names the flag. Heavy libraries (prefect, torch, datasets, openai) are imported
only by the function that needs them, so `culbot --help` answers at once.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel

from culbot.pipeline_config.loader import DEFAULT_DATA_PROFILE, DEFAULT_TRAIN_PROFILE, ConfigError, field_docs
from culbot.pipeline_config.schema import DataProfile, data_profiles, load_data_profile
from culbot.pipeline_config.train_schema import TrainProfile, load_train_profile, train_profiles

Profile = Literal["data", "train"]
MODELS: dict[str, type[BaseModel]] = {"data": DataProfile, "train": TrainProfile}


@dataclass(frozen=True)
class Flag:
    """A flag bound to one config field; ``implies`` sets other fields with it (e.g. ``--snapshot`` sets source: snapshot)."""

    flag: str
    field: str
    implies: dict[str, Any] = field(default_factory=dict)
    mapping: bool = False  # a dict field: each value is KEY=VALUE, merged into the profile's mapping


@dataclass(frozen=True)
class Arg:
    """An argument that is not a config field: a folder to read, a switch."""

    flag: str
    help: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Command:
    name: str                       # "crawl univ100"
    help: str                       # what it does: the first line of its --help
    run: Callable[..., int]         # run(args, profile) -> exit status
    profile: Profile | None = None  # the profile its flags and --data-set/--train-set apply to
    flags: tuple[Flag, ...] = ()
    args: tuple[Arg, ...] = ()


# ----- what each command runs (imports inside: only the chosen command pays for them) -----

def _print_output(out) -> None:
    """The folder, its hash (for a folder named by it, said so: the name and the hash are one thing), its counts."""
    from culbot.tasks.contracts import short_hash

    h = short_hash(out.content_hash)
    named = Path(out.path).name == h
    print(f"done: {out.path}\nhash: {h}" + (" (the folder's name)" if named else "") + f"\ncounts: {json.dumps(out.counts, ensure_ascii=False)}")


def _prefect_env() -> None:
    for k, v in {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                 "PREFECT_LOGGING_EXTRA_LOGGERS": "culbot", "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore"}.items():
        os.environ.setdefault(k, v)


def run_flow(a, dp: DataProfile) -> int:
    _prefect_env()
    from culbot.flows.params import profile_kwargs
    from culbot.pipeline_config.loader import overrides_dict

    if a.flow == "data-refresh":
        from culbot.flows.data_refresh import data_refresh

        out = data_refresh(**profile_kwargs(data_profile=a.data_profile), data_overrides=overrides_dict(a.data_overrides), force=a.force,
                           artifact_root=a.artifact_root or "")
        d = out.dataset
        print(f"dataset version {d.path.name}: {d.path}  (train {d.counts['train']}, validation {d.counts['validation']})")
        if out.index:
            print(f"index: {out.index.path}  ({out.index.counts['documents']} documents, {out.index.counts['passages']} passages)")
        print(f"formatted: {out.formatted.path}")
        return 0
    tp = load_train_profile(a.train_profile, a.train_overrides)  # fail fast, before Prefect starts
    from culbot.flows import chain_record
    from culbot.tasks.artifact_root import configured

    t0 = time.monotonic()
    # an artifact root or the Hub is state other hosts change: only a run on this host's disk alone can be answered from its record
    local = not configured(a.artifact_root) and tp.publish.target == "local"
    fp = chain_record.fingerprint(dp, tp, "publish") if local else None
    out = chain_record.recorded(tp, fp) if fp and not a.force else None
    if out is not None:
        print(f"nothing to do: the last run with this code, these profiles and these inputs is recorded and each of its "
              f"{len(chain_record.outputs(out))} outputs verifies ({time.monotonic() - t0:.1f} s; --force reruns every stage)")
    else:
        from culbot.flows.culbot import culbot

        chain_record.start()
        out = culbot(**profile_kwargs(data_profile=a.data_profile, train_profile=a.train_profile), data_overrides=overrides_dict(a.data_overrides),
                     train_overrides=overrides_dict(a.train_overrides, "--train-set"), force=a.force, artifact_root=a.artifact_root or "")
        if fp:   # the state after the run (its own release in the registry) is what an unchanged rerun sees
            chain_record.record(tp, chain_record.fingerprint(dp, tp, "publish"), out)
    print_chain(out)
    return 0


def print_chain(out) -> None:
    """What a full chain made, and how to ask the model."""
    print(f"dataset version {out.data.dataset.path.name}: {out.data.dataset.path}")
    if out.data.index:
        c = out.eval.counts
        print(f"index: {out.data.index.path}  ({out.data.index.counts['documents']} documents, {out.data.index.counts['passages']} passages; "
              f"retrieval recall@1 {c['recall_at_1']:.3f}, recall@5 {c['recall_at_5']:.3f}, MRR {c['mrr']:.3f})")
    print(f"run: {out.run.run_dir}  (eval loss {out.eval.eval_loss:.4f}, {'passed' if out.eval.passed else 'failed'})")
    c = out.eval.counts
    if "fact_recall" in c or "chrf" in c:
        print("answer quality: " + ", ".join(f"{k} {c[k]}" for k in ("fact_recall", "chrf", "groundedness", "refusal_rate", "false_refusal_rate") if k in c)
              + f" ({out.eval.reason.split('; ')[-1]})")
    if out.model:
        print(f"merged model: {out.model.path}")
    for kind, where in out.publish.published.items():
        print(f"published {kind}: {where}")
    from culbot.tasks.run_folder import ADAPTER

    model = out.model.path if out.model else out.run.run_dir / ADAPTER
    here = Path.cwd()
    rel = lambda p: os.path.relpath(p, here) if Path(p).is_relative_to(here) else str(p)   # noqa: E731
    index = f" --index {rel(out.data.index.path)}" if out.data.index else ""
    print(f"ask it: culbot chat --model {rel(model)}{index} --once \"기숙사 신청은 언제 해요?\"")


def crawl_univ100(a, dp: DataProfile) -> int:
    from culbot.tasks.crawl_univ100 import reparse, run_crawl

    _print_output(reparse(dp.univ100) if a.reparse else run_crawl(dp.univ100))
    return 0


def crawl_cbnu(a, dp: DataProfile) -> int:
    from culbot.tasks.crawl_cbnu import run_crawl

    _print_output(run_crawl(dp.cbnu))
    return 0


def generate_qa(a, dp: DataProfile) -> int:
    from culbot.tasks.generate_qa import run_generate

    _print_output(run_generate(dp.qa, a.pages or dp.cbnu.out_dir, retry_failed=a.retry_failed))
    return 0


def feedback_data(a, dp: DataProfile) -> int:
    from culbot.tasks.feedback_data import REPORT_MD, run_feedback_data

    out = run_feedback_data(dp.feedback)
    _print_output(out)
    print(f"report: {Path(out.path) / REPORT_MD}")
    return 0


def load_dataset(a, dp: DataProfile) -> int:
    from culbot.pipeline_config.schema import DatasetEntry
    from culbot.tasks.load_dataset import run_load_dataset

    if a.file:
        try:
            entries = [DatasetEntry(name=a.name or a.file.stem, file=a.file, type=a.type, out_dir=a.out)]
        except ValueError as e:
            raise ConfigError(f"load-dataset: {e}") from None
    else:
        entries = [dp.dataset(a.name)] if a.name else [d for d in dp.datasets if d.enabled]
        if a.out:
            entries = [e.model_copy(update={"out_dir": a.out}) for e in entries]
    for entry in entries:
        _print_output(run_load_dataset(entry))
    return 0


def _named_folders(items: list[str] | None, what: str) -> dict[str, Path]:
    out = {}
    for item in items or []:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ConfigError(f"{what} {item!r}: expected NAME=FOLDER, e.g. kullm=raw/datasets/kullm")
        out[name] = Path(folder)
    return out


def merge_data(a, dp: DataProfile) -> int:
    from culbot.tasks.merge_data import run_merge

    inputs = {k: v for k, v in (("univ100", a.univ100), ("cbnu", a.cbnu_qa)) if v} | _named_folders(a.source, "--source")
    defaults = {"univ100": dp.univ100.out_dir, "cbnu": dp.qa.out_dir} | {d.name: d.folder() for d in dp.datasets if d.enabled}
    _print_output(run_merge(inputs or defaults, dp.merge_data))
    return 0


def export_dataset(a, _) -> int:
    from culbot.tasks.export_dataset import export_dataset as export

    counts = export(a.dataset, a.format, a.out, a.name)
    print(f"exported {a.dataset} as {a.format}: train {counts['train']}, validation {counts['validation']}"
          + (f", {counts['skipped_completion']} plain-text rows skipped" if counts["skipped_completion"] else "") + f" -> {a.out}")
    print(f"  {a.out / 'train.jsonl'}, {a.out / 'validation.jsonl'}, {a.out / 'dataset_info.json'} (LLaMA-Factory), {a.out / 'README.md'} (dataset card)")
    return 0


def format_data(a, dp: DataProfile) -> int:
    from culbot.tasks.format import run_format

    _print_output(run_format(a.dataset, dp.format, rag=dp.rag, index=a.index))
    return 0


def index(a, dp: DataProfile) -> int:
    from culbot.tasks.embeddings import make_embedder
    from culbot.tasks.index import build_index

    _print_output(build_index(a.pages, dp.rag, qa=a.qa, dataset=a.dataset, embedder=make_embedder(dp.rag)))
    return 0


def retrieve(a, _) -> int:
    from culbot.tasks import _store
    from culbot.tasks.retrieval import Retriever, answerable, hits_json, read_questions

    retriever = Retriever(a.index)
    if a.queries:
        if not a.out:
            raise ConfigError("--queries needs --out FILE.jsonl for the hits")
        rows = []
        for q in read_questions(a.queries):
            res = retriever.search(q["question"], a.k)
            rows.append({"id": q["id"], **res.parts(), "answerable": answerable(res.confidence, retriever.threshold), "hits": hits_json(res.hits)})
        _store.atomic_write_jsonl(a.out, rows)
        refused = sum(r["answerable"] is False for r in rows)
        print(f"{len(rows)} queries -> {a.out}; {refused} below the index's no-answer threshold {retriever.threshold} (confidence on every line)")
        return 0
    if not a.query:
        raise ConfigError("give --query TEXT, or --queries FILE.jsonl --out FILE.jsonl")
    res = retriever.search(a.query, a.k)
    if a.json:
        print(json.dumps({"query": a.query, **res.parts(), "answerable": answerable(res.confidence, retriever.threshold),
                          "no_answer_threshold": retriever.threshold, "hits": hits_json(res.hits)}, ensure_ascii=False, indent=2))
        return 0
    verdict = {True: "answerable", False: "below it: chat, serve and demo refuse", None: "the index has no threshold"}[answerable(res.confidence, retriever.threshold)]
    print(f"confidence {res.confidence} (share of the question's words, idf-weighted, in the top document; top lexical score "
          f"{res.lexical_score}); the index's no-answer threshold {retriever.threshold}: {verdict}")
    for n, h in enumerate(res.hits, 1):
        print(f"\n{n}. {h.title}  [{h.doc}]  score {h.score}\n   {h.passage[:300].replace(chr(10), chr(10) + '   ')}")
    return 0


def _tokenized(a, tp: TrainProfile):
    """--data as given if it is tokenized already, else the formatted folder tokenized with the profile's base model."""
    from culbot.tasks import _store
    from culbot.tasks.model_io import resolve_base
    from culbot.tasks.plan import check_fits
    from culbot.tasks.tokenize import run_tokenize

    m = _store.read_manifest(a.data)
    if m is not None and m.stage == "tokenize":
        return a.data
    check_fits(tp)
    base = resolve_base(tp.model, models_root=tp.models_root, samples_dir=tp.samples_dir)
    return run_tokenize(a.data, base, getattr(a, "out", None) or tp.tokenized_root, tp.tokenize).path


def tokenize(a, tp: TrainProfile) -> int:
    from culbot.tasks import _store
    from culbot.tasks.contracts import StageOutput

    folder = _tokenized(a, tp)
    _print_output(StageOutput.of(folder, _store.read_manifest(folder)))
    return 0


def train(a, tp: TrainProfile) -> int:
    from culbot.tasks.plan import check_fits
    from culbot.tasks.train import launch_command, prepare_run, run_training

    if a.dry_run:   # offline: no model resolved on the Hub, nothing tokenized
        print(check_fits(tp).verdict)
        run_dir = tp.runs_root / f"{tp.name}-<run id>"
        print("launch: " + " ".join(launch_command(tp, run_dir / "config.json")))
        print("(the run id is the hash of the tokenized data and the profile, known once `culbot tokenize` has run)")
        return 0
    config = prepare_run(tp, _tokenized(a, tp))
    print("launch: " + " ".join(launch_command(tp, config)))
    res = run_training(config, tp)
    print(f"run: {config.parent}\nstatus: {res.status}, steps {res.global_step}, train loss {res.metrics.get('train_loss', float('nan')):.4f}")
    return 0


def evaluate(a, tp: TrainProfile) -> int:
    from culbot.tasks.eval import REPORT_MD, run_eval
    from culbot.tasks.run_folder import EVAL

    res = run_eval(a.run, tp.eval, a.index, answer=tp.answer, dataset=a.dataset, publish=tp.publish)
    if res.answers is not None:
        print(f"answer quality against {res.answers.baseline}: " + ", ".join(f"{k} {v}" for k, v in res.answers.metrics.gated().items()))
    print(f"gate: {res.reason}")
    print(f"eval {res.status}: loss {res.eval_loss:.4f}, perplexity {res.perplexity:.2f}; report {a.run.resolve() / EVAL / REPORT_MD}")
    return 0 if res.passed else 1


def merge_adapter(a, tp: TrainProfile) -> int:
    from culbot.tasks.merge_adapter import run_merge_adapter
    from culbot.tasks.run_folder import EVAL

    from culbot.tasks import _store

    eval_dir = a.run / EVAL   # the eval it passed goes into the merged model's card, when there is one
    _print_output(run_merge_adapter(a.run, tp.merge_adapter, a.out or tp.models_root, tp.eval.probes,
                                    eval_dir if _store.read_manifest(eval_dir) else None))
    return 0


def publish(a, tp: TrainProfile) -> int:
    from culbot.tasks.publish import run_publish

    rec = run_publish(a.run, a.model, tp.publish)
    print(json.dumps({k: p.where for k, p in rec.published.items()}, ensure_ascii=False, indent=2))
    return 0


def plan(a, _) -> int:
    from culbot.tasks import _store
    from culbot.tasks.plan import plan as make_plan
    from culbot.tasks.plan import plan_table

    names = a.train_profile or [p.stem for p in train_profiles()]
    plans = [make_plan(load_train_profile(n, a.train_overrides), examples=a.examples, tokens_per_example=a.tokens_per_example) for n in names]
    print("\n\n".join(plan_table(p) for p in plans))
    if a.json:
        _store.atomic_write_json(a.json, [p.as_dict() for p in plans])
    return 0 if all(p.fits is not False for p in plans) else 3


def tiny_model(a, _) -> int:
    from culbot.tasks.contracts import StageOutput
    from culbot.tasks.tiny_model import build_tiny_model, sample_corpus

    out = a.out or Path("artifacts/models") / ("tiny" if a.family == "gpt_neox" else f"tiny-{a.family}")   # where culbot:tiny-* is built
    _print_output(StageOutput.of(out, build_tiny_model(out, sample_corpus(a.samples), family=a.family)))
    return 0


def deploy(a, _) -> int:
    from culbot.flows.deploy import deploy as deploy_all

    deploy_all(a.prefect_file, a.home, artifact_root=a.artifact_root, notify=a.notify, run_on_new_data=a.run_on_new_data,
               git_clone=a.git_clone)
    return 0


def config(a, _) -> int:
    from culbot.pipeline_config.planner_schema import PlannerConfig

    if a.what == "docs":
        docs = {"data": DataProfile, "train": TrainProfile, "planner": PlannerConfig}
        for name in ([a.only] if a.only else docs):
            print(f"\n##### {name} ({docs[name].__name__})")
            print("\n".join(field_docs(docs[name])))
        return 0
    if a.train_profile:
        print(json.dumps(load_train_profile(a.train_profile, a.train_overrides).model_dump(mode="json"), ensure_ascii=False, indent=2))
    if a.data_profile or not a.train_profile:
        print(json.dumps(load_data_profile(a.data_profile or DEFAULT_DATA_PROFILE, a.data_overrides).model_dump(mode="json"),
                         ensure_ascii=False, indent=2))
    return 0


def templates(a, _) -> int:
    from culbot.tasks.templates import available_templates, load_template, render_prompt

    if not a.name:
        for n in available_templates():
            print(f"{n:10} {load_template(n).description}")
        return 0
    t = load_template(a.name)
    question = "충북대학교 중앙도서관은 몇 시에 여나요?"
    if t.kind == "chat":
        if a.tokenizer:
            from transformers import AutoTokenizer

            tok, through = AutoTokenizer.from_pretrained(a.tokenizer), f"the chat template of {a.tokenizer}"
        else:
            from culbot.tasks.tiny_model import build_tokenizer

            tok, through = build_tokenizer([], 300, "llama"), "the Llama-3 chat template (culbot:tiny-llama's; --tokenizer PATH for another model's)"
        print(f"{t.name}: {t.description}\n\nsystem persona: {t.system or '(none)'}\n\nRendered through {through}:\n")
    else:
        tok = None
    print(render_prompt(t, question, "", tok) + "…")
    return 0


def _limits(items: list[str], current):
    """answer.limits with --limit KEY=VALUE items applied (validated, the field named on error)."""
    from pydantic import ValidationError

    from culbot.pipeline_config.train_schema import InputLimits

    update = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or key not in InputLimits.model_fields:
            raise ConfigError(f"--limit {item!r}: expected KEY=VALUE with KEY one of {', '.join(InputLimits.model_fields)}")
        update[key] = value
    try:
        return InputLimits.model_validate({**current.model_dump(), **update})
    except ValidationError as e:
        first = e.errors()[0]
        raise ConfigError(f"--limit {first['loc'][0]}: {first['msg']}") from None


def _answerer(a, **kw):
    from culbot.tasks.answer import Answerer

    answerer = Answerer.load(a.model, a.index, max_new_tokens=a.max_new_tokens, **kw)
    answerer.spec = answerer.spec.model_copy(update={"limits": _limits(a.limit, answerer.spec.limits)})
    return answerer


def _feedback_store(a):
    """The feedback store named by --feedback-db (else $CULBOT_FEEDBACK_DB, else the default SQLite file), with answers
    past --feedback-retention-days removed; None with --no-feedback."""
    if getattr(a, "no_feedback", False):
        return None
    from pydantic import ValidationError
    from sqlalchemy.engine import make_url

    from culbot.pipeline_config.schema import FeedbackConfig
    from culbot.tasks.feedback_store import FeedbackStore

    try:   # the stage's rule: the URL given, else $CULBOT_FEEDBACK_DB (which may hold a password), else the default file
        url = FeedbackConfig(store=a.feedback_db).url()
    except ValidationError as e:
        raise ConfigError(f"--feedback-db: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    shown = make_url(url).render_as_string(hide_password=True)
    store = FeedbackStore(url)
    days = getattr(a, "feedback_retention_days", None)
    removed = store.purge(days) if days else 0
    logging.getLogger("culbot.feedback").info("feedback store %s%s", shown, f" ({removed} answers past {days:g} days removed)" if removed else "")
    return store


def _print_reply(r, show_prompt: bool) -> None:
    if show_prompt and r.prompt:
        print(f"----- prompt ({r.template}) -----\n{r.prompt}\n----- answer -----")
    for d in r:
        print(d, end="", flush=True)
    print()
    for n, s in enumerate(r.sources, 1):
        print(f"  [{n}] {s.title} {s.url}".rstrip())
    for note in r.notes:
        print(f"  ({note})")


CHAT_FEEDBACK = {"/good": "up", "/bad": "down"}   # and /fix TEXT: a correction of the last answer


def _chat_feedback(store, last, line: str) -> str:
    """What to say after /good, /bad or /fix TEXT about the last answer."""
    if store is None:
        return "feedback is off (--no-feedback)"
    if last is None:
        return "no answer yet to give feedback on"
    command, _, text = line.partition(" ")
    if command == "/fix" and not text.strip():
        return "write the right answer after /fix, e.g. /fix 3월 2일부터 신청합니다"
    store.add(last.id, rating=CHAT_FEEDBACK.get(command), correction=text if command == "/fix" else None)
    return f"thank you: feedback on {last.id} kept for review"


def chat(a, _) -> int:
    from culbot.tasks.answer import InputRejected

    answerer = _answerer(a)
    store = _feedback_store(a)
    info = answerer.info()

    def keep(r):
        if store is not None:
            from culbot.tasks.feedback_store import answer_fields

            store.record_answer(**answer_fields(r, info, channel="chat"))

    if a.once is not None:
        r = answerer.reply(a.once, retrieval=not a.no_retrieval)
        if a.json:
            r = answerer.counted(r.finish())
            print(json.dumps({"id": r.id, **r.as_dict()}, ensure_ascii=False, indent=2))
        else:
            _print_reply(r, a.show_prompt)
        keep(r)
        return 0
    print(f"Culbot: {info.id} (run {info.run}, dataset {info.dataset}, template {info.template}"
          f"{f', index {info.index}' if info.index else ', no index'}). /reset clears the conversation, /exit leaves; "
          "/good or /bad rates the last answer, /fix TEXT corrects it.")
    history: list[tuple[str, str]] = []
    last = None
    while True:
        try:
            q = input("\n질문> ").strip()
        except EOFError:
            print()
            return 0
        if q in ("/exit", "/quit"):
            return 0
        if q == "/reset":
            history = []
            continue
        if q.split(" ", 1)[0] in (*CHAT_FEEDBACK, "/fix"):
            print(f"({_chat_feedback(store, last, q)})")
            continue
        if not q:
            continue
        try:
            r = answerer.reply(q, history, retrieval=not a.no_retrieval)
        except InputRejected as e:
            print(f"({e})")
            continue
        _print_reply(r, a.show_prompt)
        keep(r)
        history.append((q, r.text))
        last = r


def serve(a, _) -> int:
    if a.engine == "vllm":
        return _serve_vllm(a)
    import uvicorn

    from culbot.tasks.serve_api import create_app

    answerer = _answerer(a, upstream=a.upstream, served_name=a.served_name)
    info = answerer.info()
    print(f"serving {info.id} at http://{a.host}:{a.port}/v1 ({'proxy to ' + a.upstream if a.upstream else 'transformers'}, "
          f"index {info.index or 'none'}); e.g. curl http://{a.host}:{a.port}/v1/models")
    if os.environ.get(a.api_key_env):
        print(f"requests need Authorization: Bearer ${a.api_key_env}")
    # SIGTERM: stop accepting, let answers in progress finish for --drain-seconds, then cancel what is left.
    uvicorn.run(create_app(answerer, max_queue=a.max_queue, api_key_env=a.api_key_env, feedback=_feedback_store(a)), host=a.host, port=a.port, log_level="info",
                timeout_graceful_shutdown=a.drain_seconds)
    return 0


def _serve_vllm(a) -> int:
    import shlex
    import shutil
    import subprocess
    import time as _time

    from culbot.tasks.answer import default_name
    from culbot.tasks.run_folder import read_run_card
    from culbot.tasks.serve_api import vllm_command, vllm_model

    card = read_run_card(a.model)
    try:
        model = vllm_model(a.model, card)
    except ValueError as e:
        raise ConfigError(f"--engine vllm: {e}") from None
    if model != Path(a.model).resolve():
        print(f"vLLM has no LoRA for this adapter's architecture ({card.model_type}): serving its merged model {model}")
        a.model, card = model, read_run_card(model)
    name = a.served_name or default_name(a.model)
    vport = a.port + 1 if a.index else a.port
    cmd = vllm_command(a.model, card, host="127.0.0.1" if a.index else a.host, port=vport, served_name=name)
    print("vllm: " + shlex.join(cmd))
    proxy = ["culbot", "serve", "--model", str(a.model), "--index", str(a.index), "--upstream", f"http://127.0.0.1:{vport}/v1",
             "--served-name", name, "--host", a.host, "--port", str(a.port)] if a.index else None
    if proxy:
        print("retrieval proxy: " + shlex.join(proxy))
    if a.dry_run:
        return 0
    if shutil.which("vllm") is None:
        raise ConfigError("--engine vllm: vllm is not installed here (pip install vllm on the GPU host; deploy/README.md)")
    if not proxy:
        os.execvp(cmd[0], cmd)
    child = subprocess.Popen(cmd)
    try:
        import httpx

        for _ in range(900):   # vLLM loads weights and captures graphs before /health answers
            if child.poll() is not None:
                raise RuntimeError(f"vllm exited with {child.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{vport}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            _time.sleep(2)
        a.engine, a.upstream = "transformers", f"http://127.0.0.1:{vport}/v1"
        return serve(a, None)
    finally:
        child.terminate()


def _day(text: str):
    import datetime as dt

    try:
        return dt.datetime.strptime(text, "%Y-%m-%d")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a day as YYYY-MM-DD") from None


def feedback_list(a, _) -> int:
    from culbot.tasks._text import shorten

    items = _feedback_store(a).items(status=a.status, rating=a.rating, since=a.since, with_correction=True if a.corrections else None,
                                     limit=a.limit)
    if a.json:
        for item in items:
            print(json.dumps(item, ensure_ascii=False))
        return 0
    if not items:
        print("no feedback matches")
        return 0
    print(f"{'id':>5}  {'rating':6}  {'status':8}  {'when (UTC)':16}  question / correction")
    for i in items:
        print(f"{i['id']:>5}  {i['rating'] or '-':6}  {i['status']:8}  {i['created_at'][:16].replace('T', ' '):16}  {shorten(i['question'], 60)}")
        if i["correction"]:
            print(f"{'':42}→ {shorten(i['correction'], 60)}")
    return 0


def feedback_show(a, _) -> int:
    item = _feedback_store(a).item(a.id)
    if item is None:
        raise ConfigError(f"no feedback item {a.id} (culbot feedback list shows them)")
    for key in ("id", "status", "rating", "reviewer", "reviewed_at", "used_in", "created_at", "channel", "model", "dataset", "index",
                "confidence", "refused", "answer_id"):
        print(f"{key}: {item[key]}")
    for key in ("question", "answer", "correction", "comment", "prompt"):
        if item[key]:
            print(f"----- {key} -----\n{item[key]}")
    for n, s in enumerate(item["sources"], 1):
        print(f"  [{n}] {s.get('title', '')} {s.get('url') or ''}".rstrip())
    return 0


def _review(a, approve: bool) -> int:
    store = _feedback_store(a)
    ids = list(a.ids)
    if getattr(a, "all_pending", False):
        ids += [i["id"] for i in store.items(status="pending", rating=a.rating, with_correction=True if a.corrections else None)]
    if not ids:
        raise ConfigError("name feedback ids (culbot feedback list --status pending), or --all-pending")
    if not a.reviewer.strip():
        raise ConfigError("--reviewer: say who reviews (no $USER here)")
    try:
        n = store.review(sorted(set(ids)), approve=approve, reviewer=a.reviewer)
    except KeyError as e:
        raise ConfigError(str(e).strip('"')) from None
    print(f"{'approved' if approve else 'rejected'} {n} item(s) as {a.reviewer.strip()}")
    return 0


def feedback_approve(a, _) -> int:
    return _review(a, approve=True)


def feedback_reject(a, _) -> int:
    return _review(a, approve=False)


def demo(a, _) -> int:
    from culbot.tasks.demo import build_demo

    answerer = _answerer(a)
    answerer.warm_up()
    build_demo(answerer, feedback=_feedback_store(a)).launch(server_name=a.host, server_port=a.port, share=False)
    return 0


# ----- the table ------------------------------------------------------------------------

FOLDER = {"type": Path, "metavar": "DIR"}
TRAIN_PROFILES = ", ".join(p.stem for p in train_profiles())
DATA_PROFILES = ", ".join(p.stem for p in data_profiles())
RUN = Arg("--run", "A run folder (artifacts/runs/<run>).", {**FOLDER, "required": True})
MODEL = Arg("--model", "A merged model (artifacts/models/<hash>) or an adapter folder (artifacts/runs/<run>/adapter).", {**FOLDER, "required": True})
INDEX = Arg("--index", "A retrieval index folder (artifacts/indexes/<hash>); without it, answers come without retrieval.", FOLDER)
MAX_NEW = Arg("--max-new-tokens", "Most tokens per answer. Default: the model's answer settings (from its eval).", {"type": int})
LIMIT = Arg("--limit", "Override a bound on what a request may hold (answer.limits: max_body_bytes 262144, max_messages 64, "
                       "max_message_chars 4000, max_total_chars 32000), e.g. --limit max_message_chars=2000 (repeatable).",
            {"action": "append", "default": [], "metavar": "KEY=VALUE"})

FEEDBACK_DB = Arg("--feedback-db", "Where answers and students' feedback are kept: a SQLAlchemy URL (sqlite:///FILE, or "
                                   "postgresql+psycopg://... for several servers; a URL with a password goes in $CULBOT_FEEDBACK_DB, not here). "
                                   "Default: $CULBOT_FEEDBACK_DB, else sqlite:///artifacts/feedback/feedback.db.", {"metavar": "URL"})
FEEDBACK_ARGS = (
    FEEDBACK_DB,
    Arg("--no-feedback", "Keep no answers and take no feedback.", {"action": "store_true"}),
    Arg("--feedback-retention-days", "Answers (and their feedback) older than this are deleted when the server starts. Default: 365.",
        {"type": float, "default": 365.0, "metavar": "DAYS"}),
)

# One override flag per profile kind, the same on every command: --data-set for data-profile fields, --train-set for
# training-profile fields (`run full` takes both).
DATA_SET = Arg("--data-set", "Override a data-profile field, e.g. --data-set qa.max_in_flight=8 (repeatable; values are YAML).",
               {"dest": "data_overrides", "action": "append", "default": [], "metavar": "KEY=VALUE"})
TRAIN_SET = Arg("--train-set", "Override a training-profile field, e.g. --train-set train.max_steps=10 (repeatable; values are YAML).",
                {"dest": "train_overrides", "action": "append", "default": [], "metavar": "KEY=VALUE"})


class _Renamed(argparse.Action):
    """--set, which meant data fields on some commands and training fields on others, points to its two successors."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error("--set is gone: use --data-set for a data-profile field or --train-set for a training-profile field")


COMMANDS: tuple[Command, ...] = (
    Command("run", "Run a flow: 'full' (data refresh, tokenize, train, eval, merge-adapter, publish) or 'data-refresh'. "
                   "Prefect runs an ephemeral server unless PREFECT_API_URL is set.", run_flow, "data", args=(
        Arg("flow", "Which flow.", {"choices": ["full", "data-refresh"]}),
        Arg("--force", "Ignore caches; rebuild every stage.", {"action": "store_true"}),
        Arg("--train-profile", f"Training profile for 'full': a name in pipeline_config/profiles/ ({TRAIN_PROFILES}) or a YAML path.",
            {"default": DEFAULT_TRAIN_PROFILE}),
        TRAIN_SET,
        Arg("--artifact-root", "Share stage outputs through this fsspec URL (a path, s3://, gs://, hf://). Default: $CULBOT_ARTIFACT_ROOT, else local disk only.",
            {"metavar": "URL"}),
    )),
    Command("crawl univ100", "Crawl univ100 Q&A through its JSON API (or a recorded snapshot), incrementally.", crawl_univ100, "data", flags=(
        Flag("--base-url", "univ100.base_url", {"univ100.source": "api"}), Flag("--campus", "univ100.campus_id"),
        Flag("--snapshot", "univ100.snapshot_dir", {"univ100.source": "snapshot"}), Flag("--max-pages", "univ100.max_pages"),
        Flag("--out", "univ100.out_dir"),
    ), args=(Arg("--reparse", "Rebuild records and rows from the raw responses kept in --out; no network.", {"action": "store_true"}),)),
    Command("crawl cbnu", "Crawl CBNU web pages (or read a folder of .txt/.html documents) into page records.", crawl_cbnu, "data", flags=(
        Flag("--seed", "cbnu.seeds", {"cbnu.source": "site"}), Flag("--allow-domain", "cbnu.allowed_domains"),
        Flag("--pages-dir", "cbnu.pages_dir", {"cbnu.source": "directory"}), Flag("--max-pages", "cbnu.max_pages"),
        Flag("--max-depth", "cbnu.max_depth"), Flag("--out", "cbnu.out_dir"),
    )),
    Command("generate-qa", "Generate Korean instruction/input/output rows from crawled CBNU pages with a chat model.", generate_qa, "data", flags=(
        Flag("--out", "qa.out_dir"), Flag("--backend", "qa.backend"), Flag("--base-url", "qa.base_url"), Flag("--model", "qa.model"),
        Flag("--replay-dir", "qa.replay_dir"), Flag("--record-replay", "qa.record_replay"),
    ), args=(
        Arg("--pages", "Folder of a finished CBNU crawl (holds pages.jsonl). Default: cbnu.out_dir.", FOLDER),
        Arg("--retry-failed", "Ask again for chunks whose cached answer was quarantined.", {"action": "store_true"}),
    )),
    Command("load-dataset", "Load the data profile's extra datasets (KULLM-v2, ...: a Hub id at a revision or a local file, in alpaca, "
                            "sharegpt, messages or completion form), or one file given here.", load_dataset, "data", args=(
        Arg("--name", "The dataset of the profile's `datasets:` list to load (default: every enabled one); with --file, its source name.", {}),
        Arg("--file", "Load this file instead of the profile's datasets (JSONL, JSON, Parquet or CSV).", {"type": Path, "metavar": "FILE"}),
        Arg("--type", "With --file: its row format.", {"choices": ["alpaca", "sharegpt", "messages", "completion"], "default": "alpaca"}),
        Arg("--out", "Output folder (default: the entry's out_dir, raw/datasets/<name>).", FOLDER),
    )),
    Command("merge-data", "Merge the source rows into a dataset version: one schema, dedup, stratified split, content hash.", merge_data, "data",
            flags=(Flag("--out", "merge_data.out_root"),), args=(
        Arg("--univ100", "Finished univ100 crawl folder (default: univ100.out_dir).", FOLDER),
        Arg("--cbnu-qa", "Finished QA generation folder (default: qa.out_dir).", FOLDER),
        Arg("--source", "NAME=FOLDER: a finished load-dataset folder and its source name (repeatable; default: every enabled "
                        "dataset of the profile, raw/datasets/<name>).", {"action": "append", "metavar": "NAME=DIR"}),
    )),
    Command("export-dataset", "Write a dataset version as alpaca or sharegpt JSONL with a dataset card and LLaMA-Factory's dataset_info.json, "
                              "ready for axolotl and LLaMA-Factory.", export_dataset, args=(
        Arg("--dataset", "A dataset version (artifacts/datasets/<version>).", {**FOLDER, "required": True}),
        Arg("--format", "alpaca (instruction/input/output, history for conversations) or sharegpt (conversations).",
            {"choices": ["alpaca", "sharegpt"], "default": "sharegpt"}),
        Arg("--out", "Output folder.", {**FOLDER, "required": True}),
        Arg("--name", "Dataset name in dataset_info.json and the card (default: culbot_<version>).", {}),
    )),
    Command("index", "Build the retrieval index of a folder of CBNU pages (a crawl, or any .txt/.html documents): passages, Korean BM25, "
                     "question keys, optional dense vectors.", index, "data", flags=(
        Flag("--out", "rag.out_root"), Flag("--dense", "rag.dense"), Flag("--embedding-model", "rag.embedding_model"),
        Flag("--embedding-base-url", "rag.embedding_base_url"),
    ), args=(
        Arg("--pages", "A CBNU crawl folder (pages.jsonl) or any folder of .txt/.html documents.", {**FOLDER, "required": True}),
        Arg("--qa", "A generate-qa folder: its questions become keys of their documents.", FOLDER),
        Arg("--dataset", "A dataset version: only its train split's questions become keys, and gold.jsonl says each question's split.", FOLDER),
    )),
    Command("retrieve", "Search an index: one --query, or a batch (--queries FILE.jsonl of {id, question} -> --out FILE.jsonl of {id, "
            "confidence, lexical_score, coverage, answerable, hits}).",
            retrieve, args=(
        Arg("--index", "An index folder (artifacts/indexes/<hash>).", {**FOLDER, "required": True}),
        Arg("--query", "A question.", {}),
        Arg("--queries", "JSONL of {\"id\", \"question\"}.", {"type": Path, "metavar": "FILE"}),
        Arg("--out", "Where the batch's hits go (JSONL of {\"id\", \"hits\": [{doc, title, url, passage, score}]}).", {"type": Path, "metavar": "FILE"}),
        Arg("--k", "Passages per query (default: the index's).", {"type": int}),
        Arg("--json", "Print the hits as JSON.", {"action": "store_true"}),
    )),
    Command("format", "Format a dataset version into prompt/response pairs with the named templates (with retrieved context, given an index).",
            format_data, "data", flags=(
        Flag("--out", "format.out_root"), Flag("--template", "format.template_map", mapping=True),
    ), args=(Arg("--dataset", "A dataset version folder (artifacts/datasets/<version>).", {**FOLDER, "required": True}),
             Arg("--index", "An index folder: CBNU rows get retrieved context as serving will (rag.train_with_context).", FOLDER))),
    Command("tokenize", "Tokenize a formatted dataset with the training profile's tokenizer: EOS, label masking, cutoff.", tokenize, "train", args=(
        Arg("--data", "A formatted dataset folder (artifacts/formatted/<hash>).", {**FOLDER, "required": True}),
        Arg("--out", "Tokenized root (default: <artifacts_root>/tokenized).", FOLDER),
    )),
    Command("train", "Train a LoRA adapter with a training profile (tokenizing a formatted dataset first); resumes if interrupted.", train, "train", args=(
        Arg("--data", "A tokenized or formatted dataset folder (artifacts/tokenized/<hash> or artifacts/formatted/<hash>).", {**FOLDER, "required": True}),
        Arg("--dry-run", "Print the plan's verdict and the launch command, offline: nothing resolved, tokenized or trained.", {"action": "store_true"}),
    )),
    Command("eval", "Evaluate a trained run: validation loss, perplexity, probe answers, retrieval (given an index), and the gate.", evaluate,
            "train", args=(RUN, Arg("--index", "An index folder: score retrieval too (eval.retrieval_questions and the validation questions).", FOLDER),
                           Arg("--dataset", "The dataset version whose validation questions are answered (default: the run's, under artifacts/datasets).",
                               FOLDER))),
    Command("merge-adapter", "Merge a run's adapter into its base model, verify the logits, save a self-describing model folder.",
            merge_adapter, "train", args=(RUN, Arg("--out", "Models root (default: <artifacts_root>/models).", FOLDER))),
    Command("publish", "Publish the merged model and/or the adapter with a model card, to the Hub or a local folder.", publish, "train", flags=(
        Flag("--target", "publish.target"), Flag("--repo-id", "publish.repo_id"), Flag("--endpoint", "publish.endpoint"),
    ), args=(RUN, Arg("--model", "A merged model folder (artifacts/models/<hash>).", FOLDER))),
    Command("chat", "Talk to a model folder (merged or adapter) in the terminal, with retrieval over an index: the training prompt exactly, "
                    "streamed, with sources.", chat, args=(
        MODEL, INDEX,
        Arg("--once", "Answer this one question and exit.", {"metavar": "QUESTION"}),
        Arg("--json", "With --once: print the answer, sources, prompt and timings as JSON.", {"action": "store_true"}),
        Arg("--show-prompt", "Print the exact rendered prompt before each answer.", {"action": "store_true"}),
        Arg("--no-retrieval", "Answer without the index.", {"action": "store_true"}),
        MAX_NEW, LIMIT, *FEEDBACK_ARGS,
    )),
    Command("serve", "Serve a model folder as an OpenAI-compatible API (/v1/chat/completions, /v1/models, /health) with retrieval; "
                     "or print and exec the `vllm serve` command for a GPU host (--engine vllm).", serve, args=(
        MODEL, INDEX,
        Arg("--host", "Address to listen on. Default: 127.0.0.1 (this host only).", {"default": "127.0.0.1"}),
        Arg("--port", "Port. Default: 8000.", {"type": int, "default": 8000}),
        Arg("--engine", "transformers: generate in this process (CPU or GPU). vllm: run vLLM's OpenAI server (with --index, "
                        "on --port + 1 behind a retrieval proxy on --port).", {"choices": ["transformers", "vllm"], "default": "transformers"}),
        Arg("--upstream", "Generate on this OpenAI-compatible server (e.g. vLLM at http://127.0.0.1:8001/v1) instead of loading the "
                          "weights; this process retrieves and renders the prompt.", {"metavar": "URL"}),
        Arg("--served-name", "Model id in the API. Default: the run's name for an adapter, culbot-<folder> for a merged model.", {}),
        Arg("--max-queue", "Requests that may wait behind the one being answered; more get 503. Default: 8.", {"type": int, "default": 8}),
        Arg("--api-key-env", "Environment variable whose value, when set, every request must send as a bearer token. Default: CULBOT_API_KEY.",
            {"default": "CULBOT_API_KEY"}),
        Arg("--dry-run", "--engine vllm: print the commands and exit.", {"action": "store_true"}),
        Arg("--drain-seconds", "On SIGTERM, answers in progress may finish for this long; then they are cancelled. Default: 5.",
            {"type": float, "default": 5.0}),
        MAX_NEW, LIMIT, *FEEDBACK_ARGS,
    )),
    Command("demo", "A web chat (gradio) over a model folder: streamed answers, sources as links, a retrieval switch, example questions "
                    "and the model's version.", demo, args=(
        MODEL, INDEX,
        Arg("--host", "Address to listen on. Default: 127.0.0.1.", {"default": "127.0.0.1"}),
        Arg("--port", "Port. Default: 7860.", {"type": int, "default": 7860}),
        MAX_NEW, LIMIT, *FEEDBACK_ARGS,
    )),
    Command("feedback list", "List students' feedback on answers, newest first: its id, rating, status, question and correction.",
            feedback_list, args=(
        FEEDBACK_DB,
        Arg("--status", "Only this review status.", {"choices": ["pending", "approved", "rejected"]}),
        Arg("--rating", "Only this rating.", {"choices": ["up", "down"]}),
        Arg("--corrections", "Only items with a correction.", {"action": "store_true"}),
        Arg("--since", "Only feedback from this day on (YYYY-MM-DD, UTC).", {"type": _day, "metavar": "DAY"}),
        Arg("--limit", "At most this many. Default: 50.", {"type": int, "default": 50}),
        Arg("--json", "One JSON object per line, with the prompt, answer and sources.", {"action": "store_true"}),
    )),
    Command("feedback show", "Show one feedback item whole: the question, the exact prompt, the answer, its sources and versions.",
            feedback_show, args=(FEEDBACK_DB, Arg("id", "A feedback id (from `culbot feedback list`).", {"type": int}))),
    Command("feedback approve", "Approve feedback items for training (recorded with the reviewer and the time).", feedback_approve, args=(
        FEEDBACK_DB,
        Arg("ids", "Feedback ids.", {"type": int, "nargs": "*"}),
        Arg("--all-pending", "Approve every pending item (with --rating and --corrections as filters).", {"action": "store_true"}),
        Arg("--rating", "With --all-pending: only this rating.", {"choices": ["up", "down"]}),
        Arg("--corrections", "With --all-pending: only items with a correction.", {"action": "store_true"}),
        Arg("--reviewer", "Who reviews. Default: $USER.", {"default": os.environ.get("USER", "")}),
    )),
    Command("feedback data", "Turn approved feedback into training data: corrections as rows, ratings as preference pairs, and a "
                             "report of what students ask that Culbot cannot answer.", feedback_data, "data", flags=(
        Flag("--feedback-db", "feedback.store"), Flag("--out", "feedback.out_dir"),
    )),
    Command("feedback reject", "Reject feedback items: they never reach training.", feedback_reject, args=(
        FEEDBACK_DB,
        Arg("ids", "Feedback ids.", {"type": int, "nargs": "+"}),
        Arg("--reviewer", "Who reviews. Default: $USER.", {"default": os.environ.get("USER", "")}),
    )),
    Command("plan", "Per-GPU memory, the largest micro batch that fits, and time and cost of training profiles.", plan, args=(
        Arg("--train-profile --profile", "Training profile (repeatable). Default: every shipped profile.",
            {"dest": "train_profile", "action": "append", "default": []}),
        TRAIN_SET,
        Arg("--examples", "Training rows per epoch (KULLM-v2 is ~153k).", {"type": int, "default": 160_000}),
        Arg("--tokens-per-example", "Mean tokens per row (default: planner.yaml).", {"type": float}),
        Arg("--json", "Also write the plans as JSON here.", {"type": Path, "metavar": "FILE"}),
    )),
    Command("tiny-model", "Build a tiny model (GPT-NeoX, Llama-3-style or Qwen2) and its tokenizer from the shipped samples (CPU runs and CI).", tiny_model, args=(
        Arg("--out", "Where to save it (default: artifacts/models/tiny, or tiny-llama, tiny-qwen2).", FOLDER),
        Arg("--family", "Architecture: gpt_neox (polyglot-ko), llama (Llama-3, no pad, <|eot_id|> turns) or qwen2.",
            {"choices": ["gpt_neox", "llama", "qwen2"], "default": "gpt_neox"}),
        Arg("--samples", "The shipped samples.", {**FOLDER, "default": Path("raw/samples")}),
    )),
    Command("deploy", "Create the work pools and deploy every flow in deploy/prefect.yaml (needs PREFECT_API_URL).", deploy, args=(
        Arg("--prefect-file", "Deployment file.", {"type": Path, "default": Path("deploy/prefect.yaml")}),
        Arg("--home", "Working directory of the flows on the workers (where raw/ and artifacts/ live). Default: $CULBOT_HOME or here.",
            {"type": Path, "default": Path(os.environ.get("CULBOT_HOME", "."))}),
        Arg("--artifact-root", "fsspec URL every host shares (s3://, gs://, hf://, or a mounted path): set on every pool, and Prefect "
                               "result storage goes to URL/prefect-results. Default: $CULBOT_ARTIFACT_ROOT, else none (one host).",
            {"default": os.environ.get("CULBOT_ARTIFACT_ROOT"), "metavar": "URL"}),
        Arg("--notify", "A notification block (TYPE/NAME, e.g. slack-webhook/lab-alerts): an automation sends it every Failed or "
                        "Crashed run of a culbot deployment.", {"metavar": "BLOCK"}),
        Arg("--run-on-new-data", "A deployment (e.g. culbot/full) that an automation starts, with the refreshed data profile, when "
                                 "data-refresh makes a new dataset version. Default: off.", {"metavar": "DEPLOYMENT"}),
        Arg("--git-clone", "A git repository URL: each run clones it at this checkout's HEAD (which must be clean and pushed) and "
                           "installs it, for workers without culbot installed.", {"metavar": "URL"}),
    )),
    Command("config", "Show a resolved data or training profile, or every config field with its documentation.", config, args=(
        Arg("what", "'show' a resolved profile, or 'docs' for every field.", {"choices": ["show", "docs"]}),
        Arg("--data-profile", "Data profile to show (default: sample).", {}),
        Arg("--train-profile", "Training profile to show.", {}),
        DATA_SET, TRAIN_SET,
        Arg("--only", "docs: only this config.", {"choices": ["data", "train", "planner"]}),
    )),
    Command("templates", "List the prompt templates, or show one rendered on an example question.", templates, args=(
        Arg("name", "A template name.", {"nargs": "?"}),
        Arg("--tokenizer", "A chat template renders through this tokenizer's own (a folder or Hub id); default: the Llama-3 template.", {}),
    )),
)


# ----- building the parser from the table ---------------------------------------------

def _field(model: type[BaseModel], dotted: str):
    *parents, name = dotted.split(".")
    for p in parents:
        model = model.model_fields[p].annotation
    return model.model_fields[name]


def _flag_kwargs(f: Flag, model: type[BaseModel]) -> dict[str, Any]:
    """argparse settings from the field: type, choices, repeatable lists, and its one description as help."""
    info = _field(model, f.field)
    # A description's "None" is Python's; on the command line and in YAML the field is simply left unset.
    help_ = re.sub(r"\bNone\b", "unset", f"{info.description or ''} [{f.field}]")
    metavar = f.field.rsplit(".", 1)[-1].upper()
    if f.mapping:
        return {"action": "append", "metavar": "KEY=VALUE", "help": help_ + " As KEY=VALUE (repeatable)."}
    ann = info.annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if typing.get_origin(ann) in (typing.Union, types.UnionType) and len(args) == 1:
        ann = args[0]
    if typing.get_origin(ann) is Literal:
        return {"choices": list(typing.get_args(ann)), "help": help_}
    if typing.get_origin(ann) is list:
        return {"action": "append", "metavar": metavar, "help": help_ + " Repeatable."}
    if ann is bool:
        return {"action": argparse.BooleanOptionalAction, "help": help_}
    return {"type": ann if ann in (int, float, Path) else str, "metavar": metavar, "help": help_}


def _profile_args(p: argparse.ArgumentParser, profile: Profile) -> None:
    if profile == "data":
        p.add_argument("--data-profile", default=DEFAULT_DATA_PROFILE, help=f"Data profile: a name in pipeline_config/ ({DATA_PROFILES}) or a YAML path. Default: {DEFAULT_DATA_PROFILE}.")
    else:
        p.add_argument("--train-profile", default=None,
                       help=f"Training profile: a name in pipeline_config/profiles/ ({TRAIN_PROFILES}) or a YAML path. Default: the "
                            f"profile a --run was trained with, else {DEFAULT_TRAIN_PROFILE}.")
    over = DATA_SET if profile == "data" else TRAIN_SET
    p.add_argument(over.flag, help=over.help, **over.kwargs)


GROUPS = {"crawl": "Crawl a source.", "feedback": "Review students' feedback on answers before it reaches training."}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="culbot", description="Culbot: build the CBNU campus chatbot, stage by stage. "
                                                            "`culbot COMMAND --help` says what a command does and lists its options.")
    ap.add_argument("--debug", action="store_true", help="Show tracebacks on errors.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for cmd in COMMANDS:
        words = cmd.name.split()
        where = sub
        if len(words) == 2:
            if words[0] not in groups:
                what = GROUPS[words[0]]
                g = sub.add_parser(words[0], help=what, description=what)
                groups[words[0]] = g.add_subparsers(dest="source", required=True, metavar="SOURCE" if words[0] == "crawl" else "ACTION")
            where = groups[words[0]]
        p = where.add_parser(words[-1], help=cmd.help, description=cmd.help)
        p.set_defaults(command_spec=cmd)
        p.add_argument("--set", nargs="?", action=_Renamed, help=argparse.SUPPRESS)
        for arg in cmd.args:
            p.add_argument(*arg.flag.split(), help=arg.help, **arg.kwargs)
        if cmd.profile:
            _profile_args(p, cmd.profile)
            for f in cmd.flags:
                p.add_argument(f.flag, dest=f"flag:{f.field}", default=None, **_flag_kwargs(f, MODELS[cmd.profile]))
    return ap


def _items(f: Flag, values: list[str]) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, v = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{f.flag} {item!r}: expected KEY=VALUE, e.g. cbnu=cbnu2")
        out[key] = v
    return out


def flag_values(cmd: Command, a: argparse.Namespace, current: BaseModel | None = None) -> dict[str, tuple[str, Any]]:
    """dotted field -> (flag, value) for every flag given, and the fields it implies.

    A mapping flag's KEY=VALUE items are merged into ``current``'s mapping (the profile as loaded without flags).
    """
    out: dict[str, tuple[str, Any]] = {}
    for f in cmd.flags:
        value = getattr(a, f"flag:{f.field}")
        if value is None:
            continue
        if f.mapping:
            base = current
            for part in f.field.split("."):
                base = getattr(base, part)
            value = {**base, **_items(f, value)}
        out[f.field] = (f.flag, str(value) if isinstance(value, Path) else value)
        out.update({k: (f.flag, v) for k, v in f.implies.items()})
    return out


def train_profile_of(a: argparse.Namespace) -> str:
    """--train-profile; else the profile the --run was trained with (eval, merge-adapter and publish apply its settings to
    that run), else DEFAULT_TRAIN_PROFILE. A given one must be the run's (run_folder.require_profile)."""
    from culbot.tasks.run_folder import RUN_CONFIG_FILE, require_profile, trained_with

    run = getattr(a, "run", None)
    has_run = run is not None and (Path(run) / RUN_CONFIG_FILE).is_file()
    if a.train_profile is None:
        return trained_with(run) if has_run else DEFAULT_TRAIN_PROFILE
    if has_run:
        try:
            require_profile(run, load_train_profile(a.train_profile).name, a.command_spec.name)
        except ValueError as e:
            raise ConfigError(f"--train-profile: {e}") from None
    return a.train_profile


def load_profile_for(cmd: Command, a: argparse.Namespace):
    """The command's profile with its --data-set/--train-set overrides and flag values, or None for commands without one."""
    if cmd.profile is None:
        return None
    if cmd.profile == "data":
        load, name, overrides = load_data_profile, a.data_profile, a.data_overrides
    else:
        load, name, overrides = load_train_profile, train_profile_of(a), a.train_overrides
    mapping = any(f.mapping and getattr(a, f"flag:{f.field}") for f in cmd.flags)
    return load(name, overrides, flag_values(cmd, a, load(name, overrides) if mapping else None))


class _RunName(logging.Filter):
    """Name the stage in Prefect's lines ("Finished in state Completed()" alone does not say which)."""

    def filter(self, record: logging.LogRecord) -> bool:
        run = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        record.where = f"{record.name} [{run}]" if run and record.name.startswith("prefect") else record.name
        return True


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from culbot.tasks.quiet import quiet

    quiet()   # before the libraries are imported; its environment is inherited by the training subprocess
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(where)s: %(message)s", datefmt="%H:%M:%S")
    for h in logging.getLogger().handlers:
        h.addFilter(_RunName())
    for noisy in ("httpx", "httpcore", "openai"):   # a line per request
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cmd: Command = a.command_spec
    try:
        return cmd.run(a, load_profile_for(cmd, a))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:   # `culbot config docs | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # people get one clear line; --debug gets the traceback
        if a.debug or os.environ.get("CULBOT_DEBUG"):
            raise
        code = getattr(e, "exit_code", 1)   # 75: preempted (resumable), 3: stopped by a training guard
        print(str(e) if code == 75 else f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
