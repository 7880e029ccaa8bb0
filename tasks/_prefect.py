"""The little Prefect glue every stage task shares: its cache policy and its report artifact.

Cores never import this; only the thin ``@task`` wrappers at the bottom of each stage module do.

A stage's cache key is its inputs, the source of every project module the stage module imports
(found by reading the imports, not listed by hand), the folder that relative output paths
resolve against, and what its module declares in ``cache_key``. The folder keeps two checkouts
that share a Prefect home apart: each writes, or finds, its outputs under its own folder.
``cache_key`` is for what the inputs' values do not show: how a live source looks now (a time
window, the content of a local folder, the baseline release). Every key part computed is
remembered (``KEYS``), so `culbot run full` can later tell "nothing to do" by calling the same
functions again, never by a copy of them.
"""
from __future__ import annotations

import ast
import importlib.util
import inspect
import math
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional

from prefect.cache_policies import INPUTS, CachePolicy

from . import _store

PROJECT = "culbot"


@lru_cache(maxsize=None)
def _package_dirs(package: str) -> tuple[Path, ...]:
    """Where a package's modules live (none for a plain module)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return ()
    return tuple(Path(p) for p in (spec.submodule_search_locations or ())) if spec else ()


@lru_cache(maxsize=None)
def _source_file(module: str) -> Path | None:
    package, _, leaf = module.rpartition(".")
    for d in _package_dirs(package) if package else ():
        for f in (d / f"{leaf}.py", d / leaf / "__init__.py"):
            if f.is_file():
                return f
    return None


@lru_cache(maxsize=None)
def _imports(module: str, project: str) -> frozenset[str]:
    """Project modules named by any import statement of ``module`` (lazy ones inside functions too)."""
    path = _source_file(module)
    if path is None:
        return frozenset()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from . import _store` names a module
    return frozenset(m for m in found if m.startswith(project + ".") and m != module and _source_file(m) is not None)


def module_closure(module: str, project: str = PROJECT) -> list[str]:
    """``module`` and every project module it imports, directly or not, sorted."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += sorted(_imports(m, project) - seen)
    return sorted(seen)


def sources_key(module: str, project: str = PROJECT) -> str:
    """Hash of the source text of ``module``'s closure: editing any of those files changes it."""
    return _store.hash_json([(m, _source_file(m).read_text(encoding="utf-8")) for m in module_closure(module, project)])


@lru_cache(maxsize=None)
def _sources_key_cached(module: str) -> str:
    return sources_key(module)  # the installed sources do not change while a process runs (imports are parsed once, too)


@dataclass
class StageSources(CachePolicy):
    """The source of the stage module and everything of the project it imports."""

    module: str = ""

    def compute_key(self, task_ctx, inputs: Optional[dict[str, Any]], flow_parameters, **kwargs) -> Optional[str]:
        return _sources_key_cached(self.module)


@dataclass
class OutputHome(CachePolicy):
    """The working directory: relative output paths (raw/..., artifacts/...) are resolved against it."""

    def compute_key(self, task_ctx, inputs: Optional[dict[str, Any]], flow_parameters, **kwargs) -> Optional[str]:
        return str(Path.cwd().resolve())


def time_window(hours: float) -> str:
    """A live source's cache window: within the same bucket of ``hours``, the last fetch is reused."""
    return f"t{math.floor(time.time() / (hours * 3600))}"


KEYS: dict[str, dict] = {}   # the declared key parts computed in this process, by function and arguments
_KEYS_LOCK = threading.Lock()


def declared_parts(fn: Callable, args: dict[str, Any]) -> dict:
    """A stage's ``cache_key`` called with the arguments it names, as a record that can be checked again later:
    {"fn": "module:name", "args": (JSON), "hash": hash of what it returned}."""
    from pydantic_core import to_jsonable_python

    return {"fn": f"{fn.__module__}:{fn.__qualname__}", "args": to_jsonable_python(args), "hash": _store.hash_json(to_jsonable_python(fn(**args)))}


def recheck(record: dict) -> bool:
    """Does the function named in ``record`` still return the same for the same arguments (and still exist)?"""
    import importlib
    import typing

    from pydantic import TypeAdapter

    try:
        module, name = record["fn"].split(":")
        fn = getattr(importlib.import_module(module), name)
        hints = typing.get_type_hints(fn)
        args = {k: TypeAdapter(hints[k]).validate_python(v) for k, v in record["args"].items()}
        return declared_parts(fn, args)["hash"] == record["hash"]
    except Exception:   # renamed, re-typed or failing: not the same key
        return False


@dataclass
class StageKey(CachePolicy):
    """The parts of a stage's key its module declares (its ``cache_key``), from the inputs that function names."""

    fn: Optional[Callable] = None

    def compute_key(self, task_ctx, inputs: Optional[dict[str, Any]], flow_parameters, **kwargs) -> Optional[str]:
        inputs = inputs or {}
        args = {k: inputs[k] for k in inspect.signature(self.fn).parameters if k in inputs}
        part = declared_parts(self.fn, args)
        with _KEYS_LOCK:
            KEYS[_store.hash_json([part["fn"], part["args"]])] = part
        return part["hash"]


def stage_cache(module: str, key: Optional[Callable] = None) -> CachePolicy:
    """Cache key = inputs (configs, paths, content hashes) + the stage's sources + where outputs go + what the stage
    declares in ``key`` (its module's ``cache_key``)."""
    policy = INPUTS + StageSources(module=module) + OutputHome()
    return policy + StageKey(fn=key) if key else policy


def stage_task(stage, **options):
    """The Prefect task of a stage's task function, named and cached from the stage's declaration (contracts.Stage):
    ``@stage_task(STAGE, retries=2)``. The first line of the module's docstring is the task's description."""
    import sys

    from prefect import task

    doc = (sys.modules[stage.module].__doc__ or "").strip().split("\n", 1)[0]
    return task(name=stage.name, description=doc or None, cache_policy=stage_cache(stage.module, key=stage.key), persist_result=True,
                **options)


def artifact_key(key: str) -> str:
    """A valid artifact key (lowercase letters, digits and dashes), so a name from config (a dataset's) can be part of it."""
    import re

    return re.sub(r"[^a-z0-9-]+", "-", key.lower())


def table(key: str, title: str, rows: list[dict]) -> None:
    """A table artifact: the UI shows it as a table, the API returns its rows."""
    from prefect.artifacts import create_table_artifact

    create_table_artifact(rows, key=artifact_key(key), description=title)


def flat_counts(counts: dict, prefix: str = "") -> list[dict]:
    """{"count": "a.b", "value": v} rows of nested counts; empty values left out."""
    rows: list[dict] = []
    for k, v in counts.items():
        if isinstance(v, dict):
            rows += flat_counts(v, f"{prefix}{k}.")
        elif v is not None:
            rows.append({"count": f"{prefix}{k}", "value": v if isinstance(v, (int, float, str, bool)) else str(v)})
    return rows


def report(key: str, title: str, counts: dict) -> None:
    """A stage's counts as a table artifact."""
    table(key, title, flat_counts(counts))


_NETWORK = {"FetchError", "TransportError", "ConnectionError", "Timeout", "TimeoutError", "RequestFailed", "APIConnectionError"}


def network_failure(exc: BaseException) -> bool:
    """Worth retrying: the network or a server failed (a parse error or a spent budget would only fail again).

    Classes are recognised by name, so this module imports no client (the stages' cache keys stay independent of them).
    """
    for e in (exc, exc.__cause__, exc.__context__):
        if e is not None and _NETWORK & {c.__name__ for c in type(e).__mro__}:
            return getattr(e, "network", True)   # a crawl stopped by a malformed page says network=False
    return False


def retry_on_network(task, task_run, state) -> bool:
    """Prefect retry condition of the network stages: retry network failures only."""
    try:
        state.result()
    except Exception as e:
        return network_failure(e)
    return False
