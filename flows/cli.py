"""The `culbot` command: one subcommand per stage, plus `run`, `config` and `templates`.

Heavy libraries (prefect, datasets, openai) are imported only by the subcommand
that needs them, so `culbot --help` answers at once.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from culbot.pipeline_config.schema import (
    CbnuConfig, ConfigError, FormatConfig, KullmConfig, MergeConfig, QAGenConfig, Univ100Config, field_doc, load_profile,
)

FLOWS = ("data-refresh", "full")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="sample", help="Data profile: a name in pipeline_config/ (sample, production) or a YAML path. Default: sample.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Override one config field, e.g. --set qa.max_in_flight=8 (repeatable).")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="culbot", description="Culbot: build the CBNU campus chatbot, stage by stage.")
    ap.add_argument("--debug", action="store_true", help="Show tracebacks on errors.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="Run a flow: 'full' (data refresh, train, eval, merge, publish) or 'data-refresh'. "
                                      "Prefect runs an ephemeral server unless PREFECT_API_URL is set.")
    run.add_argument("flow", choices=FLOWS)
    run.add_argument("--force", action="store_true", help="Ignore caches; rebuild every stage.")
    run.add_argument("--train-profile", default="cpu-tiny", help="Training profile for 'full' (a6000x4, runpod-a100x2, gcp-l4, cpu-tiny).")
    run.add_argument("--train-set", dest="train_overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="Override a training-profile field for 'full', e.g. --train-set publish.target=hub.")
    run.add_argument("--artifact-root", default=None, metavar="URL",
                     help="Share stage outputs through this fsspec URL (a path, s3://, gs://, hf://). Default: $CULBOT_ARTIFACT_ROOT, else local disk only.")
    _common(run)

    crawl = sub.add_parser("crawl", help="Crawl a source.")
    csub = crawl.add_subparsers(dest="source", required=True, metavar="SOURCE")
    u = csub.add_parser("univ100", help="univ100 Q&A through its JSON API (or a snapshot).")
    u.add_argument("--base-url", help=field_doc(Univ100Config, "base_url"))
    u.add_argument("--campus", type=int, help=field_doc(Univ100Config, "campus_id"))
    u.add_argument("--snapshot", type=Path, help=field_doc(Univ100Config, "snapshot_dir"))
    u.add_argument("--max-pages", type=int, help=field_doc(Univ100Config, "max_pages"))
    u.add_argument("--out", type=Path, help=field_doc(Univ100Config, "out_dir"))
    u.add_argument("--reparse", action="store_true", help="Rebuild records and rows from raw responses in --out; no network.")
    _common(u)
    c = csub.add_parser("cbnu", help="CBNU web pages (or a folder of documents).")
    c.add_argument("--seed", action="append", help=field_doc(CbnuConfig, "seeds") + " Repeatable.")
    c.add_argument("--allow-domain", action="append", help=field_doc(CbnuConfig, "allowed_domains") + " Repeatable.")
    c.add_argument("--pages-dir", type=Path, help=field_doc(CbnuConfig, "pages_dir"))
    c.add_argument("--max-pages", type=int, help=field_doc(CbnuConfig, "max_pages"))
    c.add_argument("--max-depth", type=int, help=field_doc(CbnuConfig, "max_depth"))
    c.add_argument("--out", type=Path, help=field_doc(CbnuConfig, "out_dir"))
    _common(c)

    g = sub.add_parser("generate-qa", help="Generate QA rows from crawled CBNU pages with a chat model.")
    g.add_argument("--pages", type=Path, help="Folder of a finished CBNU crawl (holds pages.jsonl). Default: cbnu.out_dir.")
    g.add_argument("--out", type=Path, help=field_doc(QAGenConfig, "out_dir"))
    g.add_argument("--backend", choices=["openai", "replay"], help=field_doc(QAGenConfig, "backend"))
    g.add_argument("--base-url", help=field_doc(QAGenConfig, "base_url"))
    g.add_argument("--model", help=field_doc(QAGenConfig, "model"))
    g.add_argument("--replay-dir", type=Path, help=field_doc(QAGenConfig, "replay_dir"))
    g.add_argument("--record-replay", type=Path, help=field_doc(QAGenConfig, "record_replay"))
    g.add_argument("--retry-failed", action="store_true", help="Ask again for chunks whose cached answer was quarantined.")
    _common(g)

    k = sub.add_parser("load-kullm", help="Load KULLM-v2 rows (Hub id at a revision, or a local file).")
    k.add_argument("--file", type=Path, help=field_doc(KullmConfig, "file"))
    k.add_argument("--hub-id", help=field_doc(KullmConfig, "hub_id"))
    k.add_argument("--revision", help=field_doc(KullmConfig, "revision"))
    k.add_argument("--max-rows", type=int, help=field_doc(KullmConfig, "max_rows"))
    k.add_argument("--out", type=Path, help=field_doc(KullmConfig, "out_dir"))
    _common(k)

    m = sub.add_parser("merge", help="Merge source rows, dedup, split, and write a dataset version.")
    m.add_argument("--univ100", type=Path, help="Finished univ100 crawl folder.")
    m.add_argument("--cbnu-qa", type=Path, help="Finished QA generation folder.")
    m.add_argument("--kullm", type=Path, help="Finished KULLM folder.")
    m.add_argument("--out", type=Path, help=field_doc(MergeConfig, "out_root"))
    _common(m)

    f = sub.add_parser("format", help="Format a dataset version with the prompt templates.")
    f.add_argument("--dataset", type=Path, required=True, help="A dataset version folder (artifacts/datasets/<version>).")
    f.add_argument("--out", type=Path, help=field_doc(FormatConfig, "out_root"))
    f.add_argument("--template", action="append", metavar="SOURCE=NAME", help="Template for a source, e.g. cbnu=cbnu2 (repeatable).")
    _common(f)

    def _train_common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--profile", default="cpu-tiny", help="Training profile: a name in pipeline_config/profiles/ (a6000x4, runpod-a100x2, gcp-l4, cpu-tiny) or a YAML path.")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="Override a training-profile field, e.g. --set train.max_steps=10.")

    pl = sub.add_parser("plan", help="Per-GPU memory, the largest micro batch that fits, and time and cost of a training profile.")
    pl.add_argument("--profile", action="append", default=[], help="Training profile (repeatable). Default: every shipped profile.")
    pl.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="Override a training-profile field.")
    pl.add_argument("--examples", type=int, default=160_000, help="Training rows per epoch (KULLM-v2 is ~153k).")
    pl.add_argument("--tokens-per-example", type=float, default=None, help="Mean tokens per row (default: planner.yaml).")
    pl.add_argument("--json", type=Path, default=None, help="Also write the plans as JSON here.")

    tr = sub.add_parser("train", help="Tokenize a formatted dataset and train a LoRA adapter with a training profile.")
    tr.add_argument("--data", type=Path, required=True, help="A formatted dataset folder (artifacts/formatted/<hash>).")
    tr.add_argument("--dry-run", action="store_true", help="Resolve, tokenize and print the launch command without training.")
    _train_common(tr)
    ev = sub.add_parser("eval", help="Evaluate a trained run: validation loss, perplexity, probe answers.")
    ev.add_argument("--run", type=Path, required=True, help="A run folder (artifacts/runs/<run>).")
    _train_common(ev)
    ma = sub.add_parser("merge-adapter", help="Merge a run's adapter into its base model and verify it.")
    ma.add_argument("--run", type=Path, required=True, help="A run folder (artifacts/runs/<run>).")
    ma.add_argument("--out", type=Path, help="Models root (default: <artifacts_root>/models).")
    _train_common(ma)
    pb = sub.add_parser("publish", help="Publish the merged model and/or adapter (Hub or local folder).")
    pb.add_argument("--run", type=Path, required=True, help="A run folder (artifacts/runs/<run>).")
    pb.add_argument("--model", type=Path, help="A merged model folder (artifacts/models/<hash>).")
    pb.add_argument("--target", choices=["local", "hub"], help="Where to publish.")
    pb.add_argument("--repo-id", help="Hub repo id for the merged model.")
    pb.add_argument("--endpoint", help="Hub endpoint (default: HF_ENDPOINT or huggingface.co).")
    _train_common(pb)
    tk = sub.add_parser("tokenize", help="Tokenize a formatted dataset with a model's tokenizer (EOS, label masking, cutoff).")
    tk.add_argument("--data", type=Path, required=True, help="A formatted dataset folder (artifacts/formatted/<hash>).")
    tk.add_argument("--out", type=Path, help="Tokenized root (default: <artifacts_root>/tokenized).")
    _train_common(tk)
    tm = sub.add_parser("tiny-model", help="Build the tiny GPT-NeoX and its tokenizer from the shipped samples.")
    tm.add_argument("--out", type=Path, default=Path("artifacts/models/tiny"))
    tm.add_argument("--samples", type=Path, default=Path("raw/samples"))

    dp = sub.add_parser("deploy", help="Create the work pools and deploy every flow in deploy/prefect.yaml (needs PREFECT_API_URL).")
    dp.add_argument("--prefect-file", type=Path, default=Path("deploy/prefect.yaml"), help="Deployment file.")
    dp.add_argument("--home", type=Path, default=Path(os.environ.get("CULBOT_HOME", ".")),
                    help="Working directory of the flows on the workers (where raw/ and artifacts/ live). Default: $CULBOT_HOME or here.")
    dp.add_argument("--artifact-root", default=os.environ.get("CULBOT_ARTIFACT_ROOT"), metavar="URL",
                    help="fsspec URL every host shares (s3://, gs://, hf://, or a mounted path): set on every pool, and Prefect "
                         "result storage goes to URL/prefect-results. Default: $CULBOT_ARTIFACT_ROOT, else none (one host).")

    cfg = sub.add_parser("config", help="Show the resolved config, or every field with its documentation.")
    cfg.add_argument("what", choices=["show", "docs"])
    _common(cfg)

    t = sub.add_parser("templates", help="List prompt templates, or show one rendered on an example.")
    t.add_argument("name", nargs="?")
    return ap


def _sets(prefix: str, **values) -> list[str]:
    out = []
    for key, v in values.items():
        if v is None or v is False:
            continue
        out.append(f"{prefix}.{key}={json.dumps(v if not isinstance(v, Path) else str(v), ensure_ascii=False)}")
    return out


def _print_manifest(m: dict, path) -> None:
    counts = json.dumps(m.get("counts", {}), ensure_ascii=False)
    print(f"done: {path}\ncontent hash: {m.get('content_hash', '')[:16]}\ncounts: {counts}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpcore", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # people get one clear line; --debug gets the traceback
        if args.debug or os.environ.get("CULBOT_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def _dispatch(args) -> int:
    cmd = args.command
    if cmd == "templates":
        from culbot.tasks.format_prompts import available_templates, load_template, render_prompt

        if not args.name:
            for n in available_templates():
                print(f"{n:10} {load_template(n).description}")
            return 0
        t = load_template(args.name)
        if t.kind == "chat":
            print(json.dumps(t.to_json(), ensure_ascii=False, indent=2))
        else:
            print(render_prompt(t, "충북대학교 중앙도서관은 몇 시에 여나요?", "") + "…")
        return 0

    if cmd == "plan":
        from culbot.pipeline_config.train_schema import load_train_profile, train_profiles
        from culbot.tasks.plan import plan, plan_table

        names = args.profile or [p.stem for p in train_profiles()]
        plans = [plan(load_train_profile(n, args.overrides), examples=args.examples, tokens_per_example=args.tokens_per_example) for n in names]
        print("\n\n".join(plan_table(p) for p in plans))
        if args.json:
            from culbot.tasks import _store

            _store.atomic_write_json(args.json, [p.as_dict() for p in plans])
        return 0 if all(p.fits is not False for p in plans) else 3
    if cmd == "deploy":
        from culbot.flows.deploy import deploy

        deploy(args.prefect_file, args.home, artifact_root=args.artifact_root)
        return 0
    if cmd == "tiny-model":
        from culbot.tasks.tiny_model import build_tiny_model, sample_corpus

        _print_manifest(build_tiny_model(args.out, sample_corpus(args.samples)), args.out)
        return 0
    if cmd in ("train", "eval", "merge-adapter", "publish", "tokenize"):
        return _train_side(args)

    overrides = list(args.overrides)
    if cmd == "run":
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "culbot")
        os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
        load_profile(args.profile, overrides)  # fail fast, before Prefect starts
        if args.flow == "full":
            from culbot.pipeline_config.train_schema import load_train_profile

            load_train_profile(args.train_profile, args.train_overrides)
            from culbot.flows.culbot import culbot

            out = culbot(profile=args.profile, train_profile=args.train_profile, overrides=overrides,
                         train_overrides=args.train_overrides, force=args.force, artifact_root=args.artifact_root)
            print(f"dataset version {out['data']['dataset']['content_hash'][:16]}: {out['data']['dataset']['path']}")
            print(f"run: {out['run']['run_dir']}  (eval loss {out['eval']['counts']['eval_loss']:.4f}, {out['eval']['counts']['status']})")
            if out["model"]:
                print(f"merged model: {out['model']['path']}")
            for kind, where in out["publish"]["published"].items():
                print(f"published {kind}: {where if isinstance(where, str) else where['url']}")
            return 0
        from culbot.flows.data_refresh import data_refresh

        out = data_refresh(profile=args.profile, overrides=overrides, force=args.force, artifact_root=args.artifact_root)
        d, f = out["dataset"], out["formatted"]
        print(f"dataset version {d['content_hash'][:16]}: {d['path']}  (train {d['counts']['train']}, validation {d['counts']['validation']})")
        print(f"formatted: {f['path']}")
        return 0

    if cmd == "config":
        if args.what == "docs":
            from culbot.pipeline_config.schema import DataProfile

            _docs(DataProfile, "")
            return 0
        print(json.dumps(load_profile(args.profile, overrides).model_dump(mode="json"), ensure_ascii=False, indent=2))
        return 0

    if cmd == "crawl" and args.source == "univ100":
        if args.base_url:
            overrides += _sets("univ100", source="api", base_url=args.base_url)
        if args.snapshot:
            overrides += _sets("univ100", source="snapshot", snapshot_dir=args.snapshot)
        overrides += _sets("univ100", campus_id=args.campus, max_pages=args.max_pages, out_dir=args.out)
        cfg = load_profile(args.profile, overrides).univ100
        from culbot.tasks import crawl_univ100 as cu

        if args.reparse:
            m = cu.reparse(cfg.out_dir, campus_id=cfg.campus_id, question_url=cfg.question_url, rules=cu.rules_from(cfg))
        else:
            m = cu.run_crawl(cfg)
        _print_manifest(m, cfg.out_dir)
        return 0

    if cmd == "crawl" and args.source == "cbnu":
        if args.seed:
            overrides += _sets("cbnu", source="site", seeds=args.seed)
        if args.pages_dir:
            overrides += _sets("cbnu", source="directory", pages_dir=args.pages_dir)
        overrides += _sets("cbnu", allowed_domains=args.allow_domain, max_pages=args.max_pages, max_depth=args.max_depth, out_dir=args.out)
        cfg = load_profile(args.profile, overrides).cbnu
        from culbot.tasks.crawl_cbnu import run_crawl

        _print_manifest(run_crawl(cfg), cfg.out_dir)
        return 0

    if cmd == "generate-qa":
        overrides += _sets("qa", backend=args.backend, base_url=args.base_url, model=args.model, replay_dir=args.replay_dir,
                           record_replay=args.record_replay, out_dir=args.out)
        prof = load_profile(args.profile, overrides)
        from culbot.tasks.generate_qa import run_generate

        m = run_generate(prof.qa, args.pages or prof.cbnu.out_dir, retry_failed=args.retry_failed)
        _print_manifest(m, prof.qa.out_dir)
        return 0

    if cmd == "load-kullm":
        if args.file:
            overrides += _sets("kullm", source="file", file=args.file)
        if args.hub_id or args.revision:
            overrides += _sets("kullm", source="hub", hub_id=args.hub_id, revision=args.revision)
        overrides += _sets("kullm", max_rows=args.max_rows, out_dir=args.out)
        cfg = load_profile(args.profile, overrides).kullm
        from culbot.tasks.load_kullm import run_load

        _print_manifest(run_load(cfg), cfg.out_dir)
        return 0

    if cmd == "merge":
        overrides += _sets("merge", out_root=args.out)
        prof = load_profile(args.profile, overrides)
        inputs = {k: v for k, v in (("univ100", args.univ100), ("cbnu", args.cbnu_qa), ("kullm", args.kullm)) if v}
        if not inputs:
            inputs = {"univ100": prof.univ100.out_dir, "cbnu": prof.qa.out_dir, "kullm": prof.kullm.out_dir}
        from culbot.tasks.merge_data import run_merge

        m = run_merge(inputs, prof.merge)
        _print_manifest(m, m["path"])
        return 0

    if cmd == "format":
        if args.template:
            prof0 = load_profile(args.profile, overrides)
            tmap = dict(prof0.format.template_map)
            for item in args.template:
                src, _, name = item.partition("=")
                if not name:
                    raise ConfigError(f"--template {item!r}: expected SOURCE=NAME, e.g. cbnu=cbnu2")
                tmap[src] = name
            overrides += _sets("format", template_map=tmap)
        overrides += _sets("format", out_root=args.out)
        cfg = load_profile(args.profile, overrides).format
        from culbot.tasks.format_prompts import run_format

        m = run_format(args.dataset, cfg)
        _print_manifest(m, m["path"])
        return 0
    raise AssertionError(cmd)


def _train_side(args) -> int:
    from culbot.pipeline_config.train_schema import load_train_profile

    overrides = list(args.overrides)
    if args.command == "publish":
        overrides += _sets("publish", target=args.target, repo_id=args.repo_id, endpoint=args.endpoint)
    prof = load_train_profile(args.profile, overrides)
    if args.command == "tokenize":
        from culbot.tasks.tokenize_data import run_tokenize
        from culbot.tasks.train import resolve_base

        model, sha = resolve_base(prof.model.base, prof.model.revision, models_root=Path(prof.artifacts_root) / "models", samples_dir=prof.samples_dir)
        m = run_tokenize(args.data, model, args.out or Path(prof.artifacts_root) / "tokenized", revision=sha, cutoff_len=prof.data.cutoff_len,
                         train_on_inputs=prof.data.train_on_inputs, overlength=prof.data.overlength)
        _print_manifest(m, m["path"])
        return 0
    if args.command == "train":
        from culbot.tasks.train import launch_command, prepare_run, run_training

        cfg = prepare_run(prof, args.data)
        print("launch: " + " ".join(launch_command(prof, cfg)))
        if args.dry_run:
            return 0
        res = run_training(cfg, prof)
        print(f"run: {cfg.parent}\nstatus: {res['status']}, steps {res['global_step']}, train loss {res['metrics'].get('train_loss', float('nan')):.4f}")
        return 0
    if args.command == "eval":
        from culbot.tasks.evaluate import run_eval

        res = run_eval(args.run, prof.eval)
        print(f"eval {res['status']}: loss {res['eval_loss']:.4f}, perplexity {res['perplexity']:.2f}; report {args.run / 'eval.md'}")
        return 0 if res["status"] == "passed" else 1
    if args.command == "merge-adapter":
        from culbot.tasks.merge_adapter import run_merge_adapter

        m = run_merge_adapter(args.run, prof.merge, args.out or Path(prof.artifacts_root) / "models", prof.eval.probes)
        _print_manifest(m, m["path"])
        return 0
    from culbot.tasks.publish import run_publish

    rec = run_publish(args.run, args.model, prof.publish)
    print(json.dumps(rec["published"], ensure_ascii=False, indent=2))
    return 0


def _docs(model, prefix: str) -> None:
    """Every field with its type, default and the one description it has."""
    from pydantic import BaseModel

    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            print(f"\n# {prefix}{name}: {f.description}")
            _docs(ann, f"{prefix}{name}.")
            continue
        default = "(required)" if f.is_required() else json.dumps(f.get_default(call_default_factory=True), default=str, ensure_ascii=False)
        print(f"{prefix}{name} = {default}\n    {f.description}")


if __name__ == "__main__":
    sys.exit(main())
