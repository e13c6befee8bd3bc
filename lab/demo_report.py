"""What ``make demo`` prints: steps as they happen, their checks, the closing summary.

A step is a function that shows something and checks it; a failed check raises
``StepFailed`` with the reason, which the runner prints and records. Each step returns a
``Shown``: one line for the summary's "measured" column and the commands a user would
type to do the same by hand.
"""
from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass, field


class StepFailed(Exception):
    """A step's check did not hold; the message says which and why."""


def say(text: str = "") -> None:
    print(text, flush=True)


def heading(text: str) -> None:
    say(f"\n==> {text}")


def note(text: str) -> None:
    for line in text.splitlines() or [""]:
        say(f"    {line}")


def show(result: subprocess.CompletedProcess, limit: int = 30) -> None:
    """A command's output, indented; its exit status when it failed."""
    lines = (result.stdout or "").rstrip().splitlines()
    for line in lines[:limit]:
        say(f"    | {line}")
    if len(lines) > limit:
        say(f"    | … ({len(lines) - limit} more lines)")
    if result.returncode:
        say(f"    (exit {result.returncode}) {(result.stderr or '').strip()[-500:]}")


def ruleset(host) -> str:
    """iptables-save of a namespace without comments and counters: what a daemon must
    leave as it found it."""
    out = host.run(["iptables-save"], check=False).stdout
    return "\n".join(re.sub(r"\[\d+:\d+\]", "", line) for line in out.splitlines()
                     if line and not line.startswith("#"))


def check(condition, reason: str) -> None:
    """Raise StepFailed with ``reason`` when ``condition`` does not hold."""
    if not condition:
        raise StepFailed(reason)


def wait_until(probe, what: str, timeout: float, every: float = 0.02):
    """Poll ``probe()`` until it returns something true; StepFailed after ``timeout`` s.
    Generous timeouts: the machine may be loaded, and only a real fault runs them out."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise StepFailed(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


@dataclass
class Shown:
    measured: str                                   # the summary's "measured" column
    by_hand: list = field(default_factory=list)     # [(where, command)]


@dataclass
class Outcome:
    name: str
    title: str
    ok: bool
    seconds: float
    measured: str = ""
    reason: str = ""
    by_hand: list = field(default_factory=list)


def summary(outcomes: list[Outcome]) -> None:
    heading("summary")
    rows = [("STEP", "RESULT", "TIME", "WHAT WAS SHOWN", "MEASURED")]
    for o in outcomes:
        rows.append((o.name, "ok" if o.ok else "FAILED", f"{o.seconds:.1f} s", o.title,
                     o.measured if o.ok else o.reason))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        say("    " + "  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])


def by_hand(outcomes: list[Outcome]) -> None:
    shown = [o for o in outcomes if o.by_hand]
    if not shown:
        return
    heading("doing it by hand: the commands, on each host (the demo's addresses; see docs/deployment.md)")
    for o in shown:
        say(f"    # {o.name}: {o.title}")
        width = max(len(where) for where, _ in o.by_hand)
        for where, command in o.by_hand:
            say(f"    {where.ljust(width)}  $ {command}")
