"""Releases: what was published, with its answer quality, so the next eval can compare with it.

``<publish.local_dir>/registry.json`` lists every release (newest last); each published folder also holds its
release as ``culbot_release.json``, which is how a Hub repo says what its current revision scored. The eval stage
reads the previous release from here; the publish stage records a new one.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from culbot.pipeline_config.train_schema import PublishConfig

from . import _store
from .contracts import EvalReport, Registry, Release, RunCard

log = logging.getLogger("culbot.releases")

REGISTRY = "registry.json"            # in publish.local_dir: every release, newest last (the eval gate's baseline)
RELEASE_FILE = "culbot_release.json"  # in each published folder: the release, with its answer metrics


class PublishRefused(RuntimeError):
    """The run did not pass the guards and the eval gate, or there is no Hub token."""


def hub_token(spec: PublishConfig) -> str:
    tok = os.environ.get("HF_TOKEN")
    if not tok and spec.token_secret_block:
        from prefect.blocks.system import Secret

        tok = Secret.load(spec.token_secret_block, _sync=True).get()
    if not tok:
        raise PublishRefused("no Hub token: set HF_TOKEN, or publish.token_secret_block to a Prefect Secret block")
    return tok


def registry_path(spec: PublishConfig) -> Path:
    return Path(spec.local_dir) / REGISTRY


def _hub_release(spec: PublishConfig) -> Release | None:
    """The release file of the Hub repo's current revision (None: no repo, no file, or no access)."""
    from huggingface_hub import hf_hub_download

    try:
        token = os.environ.get("HF_TOKEN") or (hub_token(spec) if spec.token_secret_block else None)
        path = hf_hub_download(spec.repo_id, RELEASE_FILE, repo_type="model", endpoint=spec.endpoint, token=token)
        return _store.read_model(Path(path), Release)
    except Exception as e:   # a first release, a private repo without a token, or the Hub unreachable
        log.warning("no previous release read from the Hub repo %s (%s: %s)", spec.repo_id, type(e).__name__, str(e)[:200])
        return None


def release_problems(release: Release) -> list[str]:
    """Why a local release can no longer be a baseline: its published folder is gone or its files no longer match the
    manifest written when it was published. A Hub release is the repo's own business (its commit is immutable)."""
    if release.target != "local":
        return []
    roots = {Path(w).parent for w in release.where.values()}
    return [p for root in sorted(roots) for p in _store.verify(root)]


def previous_release(spec: PublishConfig, exclude_run: str | None = None) -> Release | None:
    """The last model published to this target by another run (a run is never its own baseline) whose published folder
    still verifies: the local registry, else (target hub) the repo's release file. A release that no longer verifies is
    skipped with a warning, and the one before it is the baseline (issue 22: a corrupted release stayed the gate's
    baseline, never checked again)."""
    reg = registry_path(spec)
    if reg.is_file():
        mine = [r for r in _store.read_model(reg, Registry).releases if r.target == spec.target and r.run != exclude_run]
        for release in reversed(mine):
            problems = release_problems(release)
            if not problems:
                return release
            log.warning("release %s (%s) is not a baseline: %s%s", release.run, ", ".join(release.where.values()), problems[0],
                        f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        if mine:
            return None
    if spec.target == "hub" and spec.repo_id:
        hub = _hub_release(spec)
        return hub if hub is not None and hub.run != exclude_run else None
    return None


def record_release(spec: PublishConfig, release: Release) -> Path:
    """Append a release; publishing the same run to the same target again replaces its entry."""
    reg = registry_path(spec)
    old = _store.read_model(reg, Registry).releases if reg.is_file() else []
    kept = [r for r in old if (r.run, r.target) != (release.run, release.target)]
    return _store.write_model(reg, Registry(releases=[*kept, release]))


def release_of(run_dir: Path, card: RunCard, evaluation: EvalReport, target: str, where: dict[str, str]) -> Release:
    q = evaluation.answers
    return Release(run=run_dir.name, at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), target=target, where=where, dataset=card.lineage.dataset,
                   index=evaluation.index, metrics=q.metrics if q else None, answers={e.id: e.answer for e in q.examples} if q else {})
