"""What every benchmark does last: write its figures as JSON (atomically) and say where."""
from __future__ import annotations

import json
from pathlib import Path


def write_results(out: Path, res) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(out)
    print(f"\nwrote {out}")
