"""Load KULLM-v2 (nlpai-lab/kullm-v2) with datasets, keeping `input`.

Run as: culbot load-kullm --hub-id nlpai-lab/kullm-v2 --revision <sha> --out raw/kullm/
    or: culbot load-kullm --file raw/samples/kullm_sample.jsonl --out raw/kullm/

Upstream's conversion wrote input "" for every row; we keep it. Rows with a
missing or non-text field go to quarantine.jsonl with the reason.
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

from prefect import task

from culbot.pipeline_config.schema import KullmConfig

from . import _store, _text
from ._prefect import report, stage_cache
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


def load_dataset_rows(kullm: KullmConfig, revision: str | None = None):
    """The datasets.Dataset for the configured source (hub id at a revision, or a local file)."""
    import datasets

    if kullm.source == "hub":
        log.info("loading %s@%s (%s) from the Hub", kullm.hub_id, revision or kullm.revision, kullm.split)
        return datasets.load_dataset(kullm.hub_id, revision=revision or kullm.revision, split=kullm.split)
    path = Path(kullm.file)
    if not path.is_file():
        raise FileNotFoundError(f"kullm.file: {path} not found")
    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
    if kind is None:
        raise ValueError(f"kullm.file: {path}: unsupported type {path.suffix!r} (use .jsonl, .json, .parquet or .csv)")
    return datasets.load_dataset(kind, data_files=str(path), split="train")


def sample(ds, *, max_rows: int | None, fraction: float | None, seed: int):
    n = len(ds)
    keep = min(n, max_rows) if max_rows else (round(n * fraction) if fraction else n)
    if keep >= n:
        return ds
    return ds.shuffle(seed=seed).select(range(keep))


def run_load(kullm: KullmConfig, out_dir: Path | None = None) -> StageOutput:
    out_dir = Path(out_dir or kullm.out_dir)
    t0 = time.monotonic()
    (out_dir / _store.MANIFEST).unlink(missing_ok=True)
    sha = resolve_revision(kullm.hub_id, kullm.revision) if kullm.source == "hub" else None
    ds = load_dataset_rows(kullm, sha)
    total = len(ds)
    ds = sample(ds, max_rows=kullm.max_rows, fraction=kullm.fraction, seed=kullm.seed)
    rows, quarantine = [], []
    for n, row in enumerate(ds):
        clean, reason = check_row(row, n)
        if clean is None:
            quarantine.append({"stage": "load-kullm", "row": n, "reason": reason, "item": row})
        else:
            rows.append(clean)
    _store.atomic_write_jsonl(out_dir / "rows.jsonl", rows)
    _store.atomic_write_jsonl(out_dir / "quarantine.jsonl", quarantine)
    with_input = sum(1 for r in rows if r["input"].strip())
    counts = {"loaded": total, "sampled": len(ds), "rows": len(rows), "with_input": with_input, "quarantined": len(quarantine)}
    log.info("kullm: %s", counts)
    inputs = {"hub": f"{kullm.hub_id}@{sha}"} if kullm.source == "hub" else {"file": _store.sha256_file(Path(kullm.file))}
    m = _store.write_manifest(out_dir, stage="load-kullm", inputs=inputs, config=kullm.model_dump(mode="json"),
                              counts=counts, timings={"load": time.monotonic() - t0},
                              content_hash=_store.sha256_file(out_dir / "rows.jsonl"))
    return StageOutput.of(out_dir, m)


@task(name="load-kullm", cache_policy=stage_cache(__name__), persist_result=True, retries=2, retry_delay_seconds=30)
def load_kullm_task(kullm: KullmConfig, source_hash: str) -> StageOutput:
    """Network stage when loading from the Hub. ``source_hash``: the file's sha256 or hub id@revision."""
    out = run_load(kullm)
    report("load-kullm", f"KULLM-v2 ({kullm.source})", out.counts)
    return out
