"""The little Prefect glue every stage task shares: cache policy and output checks.

Cores never import this; only the thin ``@task`` wrappers and the flow do.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

from . import _store

_SHARED = ("culbot.tasks._store", "culbot.tasks._text", "culbot.tasks._http")


@dataclass
class CoreSource(CachePolicy):
    """Hash of the stage's core module sources.

    TASK_SOURCE sees only the wrapper's lines; a change in the core it calls must
    invalidate the cache too.
    """

    modules: tuple[str, ...] = field(default_factory=tuple)

    def compute_key(self, task_ctx, inputs: Optional[dict[str, Any]], flow_parameters, **kwargs) -> Optional[str]:
        sources = [inspect.getsource(importlib.import_module(m)) for m in (*self.modules, *_SHARED)]
        return _store.hash_json(sources)


def stage_cache(*core_modules: str) -> CachePolicy:
    """Cache key = inputs (paths, content hashes, config) + task source + core source."""
    return INPUTS + TASK_SOURCE + CoreSource(modules=tuple(core_modules))


def report(key: str, title: str, counts: dict, extra: str = "") -> None:
    """A markdown artifact with a stage's counts (nested dicts flattened as a.b)."""
    from prefect.artifacts import create_markdown_artifact

    flat: list[tuple[str, object]] = []
    for k, v in counts.items():
        if isinstance(v, dict):
            flat += [(f"{k}.{kk}", vv) for kk, vv in v.items()]
        else:
            flat.append((k, v))
    rows = "\n".join(f"| {k} | {v} |" for k, v in flat)
    create_markdown_artifact(f"# {title}\n\n| count | value |\n|---|---:|\n{rows}\n{extra}", key=key, description=title)


def output_ok(result: dict | None) -> bool:
    """A cached stage result is trusted only if its folder still verifies against its manifest."""
    if not result or "path" not in result:
        return False
    folder = Path(result["path"])
    manifest = _store.read_manifest(folder)
    return bool(manifest) and manifest.get("content_hash") == result.get("content_hash") and _store.is_complete(folder)
