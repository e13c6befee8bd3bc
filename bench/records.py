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


def table(records: list[dict]) -> str:
    """Records as an aligned text table (metric, value, unit, baseline, ratio); a value
    of None is a step that failed."""
    rows = [("metric", "value", "unit", "baseline", "ratio")]
    for r in records:
        v = r["value"]
        if v is None:
            v = "FAILED"
        elif isinstance(v, float):
            v = f"{v:.0f}" if abs(v) >= 100 else f"{v:.3f}"
        rows.append((r["metric"], str(v), r["unit"], r["baseline"] or "-",
                     "-" if r["ratio"] is None else f"{r['ratio']:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.rjust(w) if i in (1, 4) else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_part(run, prefix: str, width: int = 40) -> int:
    """A benchmark part's main: root check, a scratch folder, ``run(folder) -> records``,
    a table, and the records merged into ``build/bench.json``. Exit status 1 on failure."""
    import subprocess
    import sys
    import tempfile

    if os.geteuid() != 0:
        print("[bench] needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix=prefix) as work:
        try:
            records = run(Path(work))
        except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
            print(f"[bench] FAILED: {exc}", file=sys.stderr)
            return 1
    print()
    for r in records:
        print(f"{r['metric']:{width}} {r['value']:>10} {r['unit']}")
    merge(records)
    print("[bench] merged into build/bench.json", flush=True)
    return 0
