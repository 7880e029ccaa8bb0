"""The shared artifact root: stage folders copied to and from a URL through fsspec.

The lab's hosts share no disk. Content-addressed folders (dataset versions, formatted
data, tokenized data, runs, merged models) are pushed to an artifact root and pulled
on the host that needs them. The root is any fsspec URL: a local or mounted path
(the default and the tests), ``s3://bucket/culbot``, ``gs://bucket/culbot``, or a
private Hub repo, ``hf://datasets/<org>/<repo>``.

A folder's remote key is its path relative to the working directory (CULBOT_HOME),
so every host must use the same CULBOT_HOME: then paths, cache keys and remote keys
agree on all hosts. Files go up first and ``manifest.json`` last, so a remote folder
with a manifest is complete; a pull downloads into a staging folder, checks every
file against the manifest and only then renames it into place.

Set the root with CULBOT_ARTIFACT_ROOT (or the flows' ``artifact_root`` parameter).
Credentials come from the environment as fsspec expects (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, HF_TOKEN).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from pydantic import ValidationError

from . import _store
from .contracts import Manifest
from .run_folder import CHECKPOINTS, read_config

log = logging.getLogger("culbot.artifact_root")

ENV = "CULBOT_ARTIFACT_ROOT"
# Never copied: checkpoints stay on the training host (resume is local); staging folders are unfinished.
SKIP_DIRS = (CHECKPOINTS,)


class TransferError(RuntimeError):
    """A remote folder is missing, unfinished or does not match its manifest."""


def configured(root: str | None = None) -> str | None:
    """The artifact root: the argument, else $CULBOT_ARTIFACT_ROOT, else None (local disk only)."""
    return (root or os.environ.get(ENV) or "").rstrip("/") or None


def _fs(root: str):
    import fsspec

    return fsspec.core.url_to_fs(root)


def key_for(local: Path) -> str:
    """The folder's key below the root: its path relative to the working directory."""
    local, home = Path(local).resolve(), Path.cwd().resolve()
    try:
        return local.relative_to(home).as_posix()
    except ValueError:
        raise TransferError(f"{local} is outside the working directory {home}; only folders under CULBOT_HOME "
                            f"can be shared through the artifact root") from None


def url_for(local: Path, root: str) -> str:
    return f"{root.rstrip('/')}/{key_for(local)}"


def _stage_manifest(folder: Path) -> Manifest | None:
    """The folder's own stage manifest; a transfer manifest (a run pulled earlier, which may have grown since) is not one."""
    m = _store.read_manifest(folder)
    return None if m is None or m.stage == "transfer" else m


def _transfer_files(folder: Path) -> dict[str, str]:
    """Files to copy: the stage manifest's list where there is one, else every file outside SKIP_DIRS."""
    m = _stage_manifest(folder)
    if m is not None:
        return m.files
    return {rel: h for rel, h in _store.file_hashes(folder).items() if rel.split("/")[0] not in SKIP_DIRS}


def _remote_manifest(fs, base: str) -> Manifest | None:
    try:
        with fs.open(f"{base}/{_store.MANIFEST}", "rb") as f:
            return Manifest.model_validate_json(f.read())
    except FileNotFoundError:
        return None
    except ValidationError:
        return None  # another release's manifest: treated as absent, so it is pushed again


def push(local: Path, root: str) -> str:
    """Copy a finished folder to the root (manifest last); a no-op when the same content is there. Returns its URL."""
    local = Path(local)
    files = _transfer_files(local)
    own = _stage_manifest(local)
    if own is not None and _store.verify(local):
        raise TransferError(f"{local}: does not match its own manifest; not pushing a corrupt folder")
    manifest = own or Manifest(stage="transfer", files=files, content_hash=_store.hash_json(files))
    fs, base = _fs(url_for(local, root))
    there = _remote_manifest(fs, base)
    if there is not None and there.content_hash == manifest.content_hash:
        return url_for(local, root)
    for rel in files:
        fs.makedirs(f"{base}/{rel}".rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(local / rel), f"{base}/{rel}")
    with fs.open(f"{base}/{_store.MANIFEST}", "wb") as f:
        f.write((manifest.model_dump_json(indent=2) + "\n").encode("utf-8"))
    log.info("pushed %s (%d files) to %s", key_for(local), len(files), url_for(local, root))
    return url_for(local, root)


def pull(local: Path, root: str) -> bool:
    """Fetch a folder from the root into ``local`` unless a verified copy is there. True if fetched.

    Every file is checked against the remote manifest before the folder is renamed into place.
    """
    local = Path(local)
    fs, base = _fs(url_for(local, root))
    manifest = _remote_manifest(fs, base)
    mine = _store.read_manifest(local)
    if mine is not None and _store.is_complete(local) and (manifest is None or manifest.content_hash == mine.content_hash):
        return False
    if manifest is None:
        raise TransferError(f"{url_for(local, root)}: no {_store.MANIFEST} there (never pushed, or the push did not finish)")
    staging = _store.new_staging_dir(local.parent, local.name)
    try:
        for rel in manifest.files:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{base}/{rel}", str(staging / rel))
        _store.write_model(staging / _store.MANIFEST, manifest)
        problems = _store.verify(staging)
        if problems:
            raise TransferError(f"{url_for(local, root)}: the copy does not match its manifest: {'; '.join(problems[:3])}")
        if local.exists() and manifest.stage == "transfer":
            # A local folder without a manifest (e.g. a run's checkpoints) keeps its other files.
            for rel in manifest.files:
                (local / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / rel, local / rel)
            os.replace(staging / _store.MANIFEST, local / _store.MANIFEST)
            shutil.rmtree(staging, ignore_errors=True)
        else:
            _store.promote(staging, local)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("pulled %s from %s", key_for(local), root)
    return True


def run_folders(run_dir: Path) -> list[Path]:
    """What a run needs on another host: the run itself, its tokenized data and a local base model under CULBOT_HOME."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    out = [run_dir, config.data_dir(run_dir)]
    if config.card.base.path is not None:  # a local base (the tiny model), not a Hub id
        base = Path(config.base_location(run_dir))
        if base.is_relative_to(Path.cwd().resolve()):
            out.append(base)
    return out


def push_run(run_dir: Path, root: str) -> str:
    for folder in run_folders(run_dir)[1:]:
        push(folder, root)
    return push(run_dir, root)  # the run last: its manifest says everything it needs is there


def pull_run(run_dir: Path, root: str) -> bool:
    fetched = pull(run_dir, root)
    for folder in run_folders(run_dir)[1:]:
        fetched = pull(folder, root) or fetched
    return fetched
