"""Load KULLM-v2 (nlpai-lab/kullm-v2) with datasets, keeping `input`.

Run as: culbot load-kullm --hub-id nlpai-lab/kullm-v2 --revision <sha> --out raw/kullm/
    or: culbot load-kullm --file raw/samples/kullm_sample.jsonl --out raw/kullm/

Upstream's conversion wrote input "" for every row; we keep it. Rows with a
missing or non-text field go to quarantine.jsonl with the reason.
"""
from __future__ import annotations

import json
import logging
import random
import re
import time
from pathlib import Path
from typing import Any

from prefect import task

from culbot.pipeline_config.schema import KullmConfig

from . import _store, _text
from ._prefect import report, retry_on_network, stage_cache
from .contracts import StageOutput

log = logging.getLogger("culbot.load_kullm")

FIELDS = ("id", "instruction", "input", "output")


def check_row(row: dict[str, Any], n: int) -> tuple[dict | None, str | None]:
    """A KULLM row in our schema, or the reason it is broken. Text is kept as published; merge normalises."""
    out, reason = _text.instruction_fields(row, normalize=False)
    if out is None:
        return None, reason
    rid = row.get("id")
    out["id"] = f"kullm:{rid if rid not in (None, '') else n}"
    out["source"] = "kullm"
    return out, None


def resolve_revision(hub_id: str, revision: str) -> str:
    """A branch or tag resolved to its commit sha, so the manifest records exactly what was loaded."""
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    from huggingface_hub import HfApi

    return HfApi().dataset_info(hub_id, revision=revision).sha


def read_jsonl_rows(path: Path) -> tuple[list[dict], list[dict]]:
    """(rows, quarantine) of a JSON Lines file: a line that is not a JSON object is kept aside with its number."""
    rows, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append({"file": str(path), "line": n, "reason": f"not_json: {e.msg} at column {e.colno}", "raw": line[:2000]})
                continue
            if not isinstance(row, dict):
                bad.append({"file": str(path), "line": n, "reason": "not_an_object", "raw": line[:2000]})
                continue
            rows.append({**row, "__line__": n})
    return rows, bad


def load_rows(kullm: KullmConfig, revision: str | None = None) -> tuple[list[dict], list[dict], str]:
    """(rows, quarantine, where): the configured source's rows, each with where it came from."""
    import datasets

    if kullm.source == "hub":
        log.info("loading %s@%s (%s) from the Hub", kullm.hub_id, revision or kullm.revision, kullm.split)
        ds = datasets.load_dataset(kullm.hub_id, revision=revision or kullm.revision, split=kullm.split)
        return [{**r, "__line__": i} for i, r in enumerate(ds)], [], f"{kullm.hub_id}@{revision or kullm.revision}"
    path = Path(kullm.file)
    if not path.is_file():
        raise FileNotFoundError(f"kullm.file: {path} not found")
    if path.suffix == ".jsonl" or (path.suffix == ".json" and not path.read_text(encoding="utf-8", errors="replace").lstrip().startswith("[")):
        return (*read_jsonl_rows(path), str(path))
    kind = {".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
    if kind is None:
        raise ValueError(f"kullm.file: {path}: unsupported type {path.suffix!r} (use .jsonl, .json, .parquet or .csv)")
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:
        raise ValueError(f"kullm.file: {path}: cannot be read as {kind} ({type(e).__name__}: {e})") from None
    return [{**r, "__line__": i} for i, r in enumerate(ds)], [], str(path)


def sample(rows: list[dict], *, max_rows: int | None, fraction: float | None, seed: int) -> list[dict]:
    """A deterministic sample (by seed) of at most ``max_rows`` or ``fraction`` of the rows, in their order."""
    n = len(rows)
    keep = min(n, max_rows) if max_rows else (round(n * fraction) if fraction else n)
    if keep >= n:
        return rows
    return [rows[i] for i in sorted(random.Random(seed).sample(range(n), keep))]


def run_load(kullm: KullmConfig, out_dir: Path | None = None) -> StageOutput:
    out_dir = Path(out_dir or kullm.out_dir)
    t0 = time.monotonic()
    (out_dir / _store.MANIFEST).unlink(missing_ok=True)
    sha = resolve_revision(kullm.hub_id, kullm.revision) if kullm.source == "hub" else None
    loaded, quarantine, where = load_rows(kullm, sha)
    quarantine = [{"stage": "load-kullm", **q} for q in quarantine]
    picked = sample(loaded, max_rows=kullm.max_rows, fraction=kullm.fraction, seed=kullm.seed)
    rows = []
    for n, row in enumerate(picked):
        line = row.pop("__line__")
        clean, reason = check_row(row, n)
        if clean is None:
            quarantine.append({"stage": "load-kullm", "file": where, "line": line, "row": n, "reason": reason, "item": row})
        else:
            rows.append(clean)
    quarantine.sort(key=lambda q: q["line"])   # in file order
    _store.atomic_write_jsonl(out_dir / "rows.jsonl", rows)
    _store.atomic_write_jsonl(out_dir / "quarantine.jsonl", quarantine)
    with_input = sum(1 for r in rows if r["input"].strip())
    counts = {"loaded": len(loaded), "sampled": len(picked), "rows": len(rows), "with_input": with_input, "quarantined": len(quarantine)}
    log.info("kullm: %s", counts)
    if quarantine:
        log.warning("kullm: %d row(s) kept aside in %s (first: %s line %s, %s)", len(quarantine), out_dir / "quarantine.jsonl",
                    quarantine[0].get("file"), quarantine[0].get("line"), quarantine[0]["reason"])
    inputs = {"hub": f"{kullm.hub_id}@{sha}"} if kullm.source == "hub" else {"file": _store.sha256_file(Path(kullm.file))}
    m = _store.write_manifest(out_dir, stage="load-kullm", inputs=inputs, config=kullm.model_dump(mode="json"),
                              counts=counts, timings={"load": time.monotonic() - t0},
                              content_hash=_store.sha256_file(out_dir / "rows.jsonl"))
    return StageOutput.of(out_dir, m)


@task(name="load-kullm", cache_policy=stage_cache(__name__), persist_result=True, retries=2, retry_delay_seconds=30,
      retry_condition_fn=retry_on_network)
def load_kullm_task(kullm: KullmConfig, source_hash: str) -> StageOutput:
    """Network stage when loading from the Hub (network failures are retried). ``source_hash``: the file's sha256 or hub id@revision."""
    out = run_load(kullm)
    report("load-kullm", f"KULLM-v2 ({kullm.source})", out.counts)
    return out
