"""Benchmark steps that fail alone: a failing measurement is kept and reported, its
records read FAILED, and the run goes on to the next (bench.fastpath, bench.udp)."""
from __future__ import annotations

import sys
from pathlib import Path

from bench.records import merge, table


def summary(exc: BaseException) -> str:
    """One line for the list of failures: the first line, and the last line of a log
    that follows it (a gateway's refusal is its log's last line)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return text[:400]


class Steps:
    """Runs the measurements one by one. A step is a function returning {metric: value};
    ``progress`` prints a line of the run."""

    def __init__(self, progress):
        self.progress = progress
        self.values: dict[str, float] = {}
        self.failures: list[tuple[str, str]] = []

    def step(self, name: str, fn, guard=None) -> bool:
        self.progress(name)
        try:
            if guard is not None:
                guard()
            self.values.update(fn())
            return True
        except Exception as exc:          # noqa: BLE001 - any failure is a failed step, the run goes on
            self.fail(name, exc)
            return False

    def fail(self, name: str, exc: BaseException) -> None:
        self.failures.append((name, summary(exc)))
        self.progress(f"FAILED: {name}: {type(exc).__name__}: {str(exc)[-2000:]}")


def finish(bench: str, records: list[dict], steps: Steps, path: Path) -> int:
    """Print the table, merge the records into ``path``, list the failed steps; the
    exit status (1 if any step failed)."""
    print()
    print(table(records))
    merge(records, path)
    steps.progress(f"merged into {path}")
    if not steps.failures:
        return 0
    print(f"\n[{bench}] {len(steps.failures)} step(s) failed:", file=sys.stderr)
    for name, why in steps.failures:
        print(f"  - {name}: {why}", file=sys.stderr)
    return 1
