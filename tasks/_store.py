"""The artifact store: content hashes, atomic writes, manifests, and contract files on disk.

Every stage output is a folder whose ``manifest.json`` is written last. A folder
without a manifest (or whose files no longer match it) is unfinished and is never
trusted by a later stage or by a cache. This is the one place that writes files
atomically (temporary file, fsync, rename).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

from pydantic import BaseModel, ValidationError

from .contracts import MANIFEST_FILE as MANIFEST
from .contracts import Lineage, Manifest, StageRef, short_hash

M = TypeVar("M", bound=BaseModel)


# ----- hashing -------------------------------------------------------------

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def stable_share(key: str) -> float:
    """A stable number in [0, 1) per key (a row id): the same rows are picked on every rebuild, on every host."""
    return int(sha256_text(key)[:8], 16) / 16 ** 8


def canonical_json(obj: Any) -> str:
    """One JSON text per value: sorted keys, no spaces, UTF-8 kept."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def hash_json(obj: Any) -> str:
    return sha256_text(canonical_json(obj))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hashes(folder: Path, exclude: Iterable[str] = (MANIFEST,)) -> dict[str, str]:
    """relative path -> sha256 of every file below ``folder`` (sorted, stable)."""
    folder = Path(folder)
    skip = set(exclude)
    out: dict[str, str] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            rel = p.relative_to(folder).as_posix()
            if rel in skip or ".tmp-" in p.name:
                continue
            out[rel] = sha256_file(p)
    return out


def tree_hash(folder: Path, exclude: Iterable[str] = (MANIFEST,)) -> str:
    """Content hash of a folder: its file names and bytes, not timestamps."""
    return hash_json(file_hashes(folder, exclude))


# ----- atomic writes -------------------------------------------------------

def umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask can only set it, which races threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_mode(path: Path, mask: int | None = None) -> None:
    """Give a file or folder made by tempfile (0600 / 0700, whatever the umask) the mode a plain open() or mkdir() would
    have had, so the lab's other users and a serving account can read what culbot promotes."""
    mask = umask() if mask is None else mask
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~mask)


def normal_modes(folder: Path) -> None:
    """normal_mode for a folder and everything in it: libraries write through temporary files too (transformers'
    safetensors are 0600), and a copy keeps its source's mode."""
    mask = umask()
    for p in [Path(folder), *Path(folder).rglob("*")]:
        if not p.is_symlink():
            normal_mode(p, mask)


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write to a temporary file beside ``path``, fsync, then rename over it (with the umask's mode, not mkstemp's 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _finite(obj: Any) -> Any:
    """NaN and infinities as null: they are not JSON, and other readers refuse them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def strict_json(obj: Any, **kw) -> str:
    """JSON that any reader accepts: never a bare NaN or Infinity."""
    try:
        return json.dumps(obj, ensure_ascii=False, sort_keys=True, default=str, allow_nan=False, **kw)
    except ValueError:
        return json.dumps(_finite(obj), ensure_ascii=False, sort_keys=True, default=str, allow_nan=False, **kw)


def atomic_write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, strict_json(obj, indent=2) + "\n")


def atomic_write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    return atomic_write_text(path, "".join(strict_json(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); fix or delete that line") from e
    return rows


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ----- manifests -----------------------------------------------------------

_CODE_VERSION: str | None = None


def package_dirs() -> list[Path]:
    """The folders of culbot's code and shipped config (flows, tasks, pipeline_config), beside this one."""
    root = Path(__file__).resolve().parent.parent
    return [root / name for name in ("flows", "tasks", "pipeline_config")]


def code_version() -> str:
    """The one identity of this culbot: '<package version>+src.<hash of every source, profile, template and prompt>'.
    The same for an editable checkout and a wheel built from it, different after any change; manifests, deployments
    (a worker with other code refuses a run) and the chain record use it."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            pkg = version("culbot")
        except PackageNotFoundError:
            pkg = "0"
        h = hashlib.sha256()
        for d in package_dirs():
            for p in sorted(d.rglob("*")):
                if p.is_file() and p.suffix in (".py", ".yaml", ".json", ".jinja", ".txt") and "__pycache__" not in p.parts:
                    h.update(f"{d.name}/{p.relative_to(d).as_posix()}\0".encode())
                    h.update(p.read_bytes())
        _CODE_VERSION = f"{pkg}+src.{h.hexdigest()[:12]}"
    return _CODE_VERSION


def write_manifest(
    folder: Path,
    *,
    stage: str,
    inputs: dict[str, str],
    config: dict[str, Any],
    counts: dict[str, Any],
    lineage: Lineage = Lineage(),
    timings: dict[str, float] | None = None,
    content_hash: str | None = None,
) -> Manifest:
    """Write ``manifest.json`` last, every file and folder in it given the umask's modes first. ``content_hash`` defaults
    to the folder's tree hash."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    normal_modes(folder)
    files = file_hashes(folder)
    manifest = Manifest(
        stage=stage, created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), code_version=code_version(),
        inputs=inputs, lineage=lineage, config=config, counts=counts,
        timings_s={k: round(v, 3) for k, v in (timings or {}).items()}, files=files,
        content_hash=content_hash or hash_json(files),
    )
    write_model(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: Path) -> Manifest | None:
    """The folder's manifest; None when it is missing, unreadable or of another version (unfinished, for every reader)."""
    try:
        return read_model(Path(folder) / MANIFEST, Manifest)
    except (FileNotFoundError, ValueError):
        return None


def verify(folder: Path) -> list[str]:
    """Problems with a finished folder; an empty list means every file matches its manifest."""
    folder = Path(folder)
    p = folder / MANIFEST
    try:
        m = read_model(p, Manifest)
    except FileNotFoundError:
        return [f"{folder}: no readable {MANIFEST} (unfinished or corrupt output)"]
    except ValueError as e:
        return [str(e)]
    problems = []
    for rel, want in m.files.items():
        f = folder / rel
        if not f.is_file():
            problems.append(f"{f}: missing")
        elif sha256_file(f) != want:
            problems.append(f"{f}: content hash mismatch")
    return problems


def is_complete(folder: Path) -> bool:
    return not verify(folder)


def read_input(source: Path | StageRef, what: str) -> tuple[Path, Manifest]:
    """A stage's input folder and its manifest. It must verify, and, handed over as a StageRef, hold the content
    its hash names (the hash the task's cache key was made from)."""
    path = Path(source.path if isinstance(source, StageRef) else source)
    problems = verify(path)
    if problems:
        inside = sorted((p.parent for p in path.glob(f"*/{MANIFEST}")), key=lambda p: p.stat().st_mtime) if path.is_dir() else []
        hint = f"; it holds finished outputs, e.g. {inside[-1]} (the newest)" if inside and not (path / MANIFEST).exists() else ""
        raise RuntimeError(f"{what}: {problems[0]}{hint}")
    m = read_manifest(path)
    if isinstance(source, StageRef) and m.content_hash != source.content_hash:
        raise RuntimeError(f"{what}: {path} holds {short_hash(m.content_hash)}, not the {short_hash(source.content_hash)} it was "
                           f"handed over as; it changed after the stage that made it finished")
    return path, m


# ----- contract files ------------------------------------------------------------

def write_model(path: Path, model: BaseModel) -> Path:
    """A contract (tasks/contracts.py) as JSON, atomically."""
    return atomic_write_text(path, model.model_dump_json(indent=2) + "\n")


def read_model(path: Path, cls: type[M]) -> M:
    """A contract file, validated; a wrong or unknown shape is a ValueError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    try:
        return cls.model_validate_json(text)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ValueError(f"{path}: not a valid {cls.__name__}"
                         f"{f' (field {where!r})' if where else ''}: {first['msg']}") from None


def new_staging_dir(parent: Path, name: str) -> Path:
    """A new folder beside the final one (a unique name, the umask's mode); renamed into place when complete."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-"))
    normal_mode(staging)
    return staging


def reopen(folder: Path) -> Path:
    """Start rewriting ``folder`` in place: its manifest goes first, so the folder counts as unfinished until
    write_manifest lands the new one. For the stages that update one folder incrementally (the crawls keep their raw
    responses, generate-qa and load-dataset their caches, eval and publish a run's subfolder); every other stage builds
    in new_staging_dir and promotes."""
    folder = Path(folder)
    (folder / MANIFEST).unlink(missing_ok=True)
    return folder


def promote(staging: Path, final: Path, replace: bool = False) -> Path:
    """Move a finished staging folder to ``final``. An existing verified folder wins (its name is its content), unless
    ``replace``: a folder named for something other than its content (a run's published copy) is replaced."""
    staging, final = Path(staging), Path(final)
    if final.exists():
        if is_complete(final) and not replace:
            shutil.rmtree(staging, ignore_errors=True)
            return final
        shutil.rmtree(final)  # a half or corrupt folder is never trusted
    os.replace(staging, final)
    return final



# ----- tables ----------------------------------------------------------------------

def write_text_table(path: Path, rows: list[dict], columns: tuple[str, ...]) -> Path:
    """Rows of text columns as parquet, atomically (pyarrow directly; datasets reads it back as is)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pydict({c: [r[c] for r in rows] for c in columns}, schema=pa.schema([(c, pa.string()) for c in columns]))
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    return atomic_write_bytes(path, buf.getvalue().to_pybytes())


def read_table(path: Path, columns: list[str] | None = None) -> list[dict]:
    """The rows of a parquet file written by a stage; a missing file names the folder it belongs to."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; is {path.parent} a finished stage output?")
    return pq.read_table(path, columns=columns).to_pylist()


def count_rows(path: Path) -> int:
    """Rows in a parquet file, from its footer."""
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


def iter_rows(path: Path, columns: list[str] | None = None, batch_size: int = 2048) -> Iterator[list[dict]]:
    """The rows of a stage's parquet file in batches, read as they are consumed."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; is {path.parent} a finished stage output?")
    with pq.ParquetFile(path) as f:
        for batch in f.iter_batches(batch_size=batch_size, columns=columns):
            yield batch.to_pylist()
