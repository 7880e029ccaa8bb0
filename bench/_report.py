"""What every benchmark does last: write its figures as JSON (atomically) and say where."""
from __future__ import annotations

from pathlib import Path


def write_results(out: Path, res) -> None:
    from culbot.tasks import _store

    _store.atomic_write_json(out, res)
    print(f"\nwrote {out}")
