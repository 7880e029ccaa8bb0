"""Stage 5: format a dataset version into prompt/response pairs with named templates.

Run as: culbot format --dataset artifacts/datasets/<version> --out artifacts/formatted

Templates live in pipeline_config/templates/<name>.json (alpaca-lora's keys:
description, prompt_input, prompt_no_input, response_split). Rendering is pure,
and training and serving call the same :func:`render_prompt`, so prompts never
drift between them. The full text of every template used is saved with the data.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import task

from culbot.pipeline_config.schema import PACKAGE_DIR, ConfigError, FormatConfig

from . import _store
from ._prefect import stage_cache
from .merge_data import read_split

log = logging.getLogger("culbot.format")

TEMPLATE_DIR = PACKAGE_DIR / "templates"


@dataclass(frozen=True)
class Template:
    name: str
    description: str = ""
    kind: str = "alpaca"              # "alpaca": fixed text; "chat": the tokenizer's chat template
    prompt_input: str = ""
    prompt_no_input: str = ""
    response_split: str | None = None
    system: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def available_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.json"))


def load_template(name: str, folder: Path = TEMPLATE_DIR) -> Template:
    path = Path(folder) / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"unknown template {name!r}; available: {', '.join(available_templates())}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        t = Template(name=name, **data)
    except (json.JSONDecodeError, TypeError) as e:
        raise ConfigError(f"{path}: not a valid template ({e})") from None
    if t.kind == "alpaca":
        for field, text in (("prompt_input", t.prompt_input), ("prompt_no_input", t.prompt_no_input)):
            if "{instruction}" not in text:
                raise ConfigError(f"{path}: field '{field}' lacks {{instruction}}")
        if "{input}" not in t.prompt_input:
            raise ConfigError(f"{path}: field 'prompt_input' lacks {{input}}")
    elif t.kind != "chat":
        raise ConfigError(f"{path}: field 'kind' must be 'alpaca' or 'chat', not {t.kind!r}")
    return t


def render_prompt(t: Template, instruction: str, input: str = "", tokenizer: Any = None) -> str:
    """The exact prompt text for one example (everything before the response)."""
    if t.kind == "chat":
        if tokenizer is None:
            raise ConfigError(f"template {t.name!r} renders through a tokenizer's chat template; set format.chat_tokenizer")
        user = instruction if not input else f"{instruction}\n\n{input}"
        messages = ([{"role": "system", "content": t.system}] if t.system else []) + [{"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # str.replace, not str.format: user text may contain braces.
    if input:
        return t.prompt_input.replace("{instruction}", instruction).replace("{input}", input)
    return t.prompt_no_input.replace("{instruction}", instruction)


def extract_response(t: Template, generated: str) -> str:
    """The model's answer from a full generated text (serving side)."""
    if t.response_split and t.response_split in generated:
        return generated.split(t.response_split, 1)[1].strip()
    return generated.strip()


def format_rows(rows: list[dict], templates: dict[str, Template], default: str, tokenizer: Any = None) -> list[dict]:
    out = []
    for r in rows:
        t = templates.get(r["source"]) or templates[default]
        out.append({"id": r["id"], "source": r["source"], "template": t.name,
                    "prompt": render_prompt(t, r["instruction"], r["input"], tokenizer), "response": r["output"]})
    return out


def _load_tokenizer(name: str | None):
    if not name:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def run_format(dataset_dir: Path, cfg: FormatConfig, out_root: Path | None = None) -> dict:
    t0 = time.monotonic()
    dataset_dir, out_root = Path(dataset_dir), Path(out_root or cfg.out_root)
    problems = _store.verify(dataset_dir)
    if problems:
        raise RuntimeError(f"format input is not a finished dataset version: {problems[0]}")
    dm = _store.read_manifest(dataset_dir)
    names = {**cfg.template_map}
    templates = {src: load_template(n) for src, n in names.items()}
    templates[cfg.default_template] = load_template(cfg.default_template)
    tokenizer = _load_tokenizer(cfg.chat_tokenizer) if any(t.kind == "chat" for t in templates.values()) else None
    splits = {s: format_rows(read_split(dataset_dir, s), templates, cfg.default_template, tokenizer) for s in ("train", "validation")}
    used = {t.name: t.to_json() for t in templates.values()}
    version = _store.hash_json({"dataset": dm["content_hash"], "templates": used, "map": names, "default": cfg.default_template,
                                "chat_tokenizer": cfg.chat_tokenizer})
    final = out_root / version[:16]
    counts = {s: len(rows) for s, rows in splits.items()}
    counts["by_template"] = {}
    for rows in splits.values():
        for r in rows:
            counts["by_template"][r["template"]] = counts["by_template"].get(r["template"], 0) + 1
    if not _store.is_complete(final):
        import datasets

        staging = _store.new_staging_dir(out_root, version[:16])
        cols = ("id", "source", "template", "prompt", "response")
        for s, rows in splits.items():
            datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in cols},
                                       features=datasets.Features({c: datasets.Value("string") for c in cols})).to_parquet(str(staging / f"{s}.parquet"))
        _store.atomic_write_json(staging / "templates.json", {"map": names, "default": cfg.default_template, "templates": used})
        _store.write_manifest(staging, stage="format", inputs={"dataset": dm["content_hash"], "dataset_path": str(dataset_dir)},
                              config=cfg.model_dump(mode="json"), counts=counts, timings={"format": time.monotonic() - t0},
                              content_hash=version, extra={"templates": used, "dataset_version": dm.get("dataset_version")})
        _store.promote(staging, final)
        log.info("formatted %s -> %s: %s", dataset_dir.name, final, counts)
    return _store.read_manifest(final) | {"path": str(final)}


@task(name="format", cache_policy=stage_cache(__name__, "culbot.tasks.merge_data"), persist_result=True)
def format_task(config: dict, dataset: dict) -> dict:
    cfg = FormatConfig.model_validate(config)
    m = run_format(Path(dataset["path"]), cfg)
    return {"path": str(Path(m["path"]).resolve()), "content_hash": m["content_hash"], "counts": m["counts"]}
