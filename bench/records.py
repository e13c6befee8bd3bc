"""``build/bench.json``: the records every benchmark part merges its numbers into."""
from __future__ import annotations

import json
import os
from pathlib import Path

BENCH_JSON = Path(__file__).resolve().parent.parent / "build" / "bench.json"


def merge(records: list[dict], path: Path = BENCH_JSON) -> None:
    """Replace the records of the same metrics, keep the others (atomically)."""
    try:
        existing = json.loads(path.read_text())
        if not isinstance(existing, list):
            existing = []
    except (OSError, ValueError):
        existing = []
    names = {r["metric"] for r in records}
    merged = [r for r in existing if r.get("metric") not in names] + records
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(merged, indent=2) + "\n")
    os.replace(tmp, path)
