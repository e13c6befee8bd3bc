"""``make demo``: the whole system in network namespaces, each step checked as it happens.

    pair      a static gateway pair: curl by virtual address, 10 MB, the SAL on the wire
    name      an unmodified client resolves web.svc.example and loads the page by name
    spread    twenty requests spread over two replicas by the service router
    failover  one replica's server killed: new requests go to the other at once
    move      a download while the client gateway's address is replaced
    restart   the client gateway killed (kill -9) and restarted during a download

``python -m lab.demo`` runs them all (``make demo``); ``--step NAME`` (``make demo
STEP=NAME``) runs one, and may be given more than once. The story steps share one routed
deployment (lab/demo_world.py), built before the first of them. At the end: a summary of
what was shown and measured, the commands to do it by hand, and a check that nothing is
left behind. Exit status 0 when every step's checks held, 1 when one did not (the summary
says which and why), 2 when the demo cannot run here.
"""
from __future__ import annotations

import argparse
import glob
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from lab import demo_pair, demo_story
from lab.demo_report import Outcome, StepFailed, by_hand, heading, note, say, summary
from lab.demo_world import World, remove

STEPS = {           # name: (title, function of the Run or, if it needs it, of the routed World)
    "pair": (demo_pair.TITLE, demo_pair.run, False),
    "name": (demo_story.NAME_TITLE, demo_story.name, True),
    "spread": (demo_story.SPREAD_TITLE, demo_story.spread, True),
    "failover": (demo_story.FAILOVER_TITLE, demo_story.failover, True),
    "move": (demo_story.MOVE_TITLE, demo_story.move, True),
    "restart": (demo_story.RESTART_TITLE, demo_story.restart, True),
}
CLEANUP_TITLE = "nothing left behind: namespaces, processes, rules, pins, files"


class Interrupted(BaseException):
    """SIGTERM or Ctrl-C: stop the steps, still clean up."""


class Run:
    """What one demo run made, so that all of it can be removed and checked gone."""

    def __init__(self):
        self.cleanup_paths: list[Path] = []
        self.lab_prefixes: list[str] = []
        self.netns_ids: set[int] = set()        # daemons' state files are named .net<id>
        self.not_ours: set[str] = set()         # such files there before (an id used again)
        self._world: World | None = None
        self._world_error = ""

    def world(self) -> World:
        """The routed deployment, built on first use; later, made whole again (a failed
        step may have left a daemon or a replica down), so one failure does not cascade."""
        if self._world_error:
            raise StepFailed(f"the routed deployment could not be built: {self._world_error}")
        if self._world is None:
            heading("setting up the routed deployment: namespaces, two replicas, the resolver, a router, gateways")
            self._world = World(self)
            try:
                self._world.build()
            except Exception as exc:
                self._world_error = str(exc) if isinstance(exc, StepFailed) else first_line(exc)
                self._world.log_tails()
                raise StepFailed(f"the routed deployment could not be built: {self._world_error}") from exc
        else:
            try:
                self._world.ready()
            except Exception as exc:
                raise StepFailed(f"the routed deployment could not be made whole again: {first_line(exc)}") from exc
        return self._world

    def track(self, lab) -> None:
        """Remember a lab (called as soon as it exists, and again once it has its hosts)."""
        if lab.prefix not in self.lab_prefixes:
            self.lab_prefixes.append(lab.prefix)
        for host in lab.hosts.values():
            try:
                ino = os.stat(f"/run/netns/{host.ns}").st_ino
            except OSError:
                continue
            if ino not in self.netns_ids:
                self.netns_ids.add(ino)
                self.not_ours.update(state_files(ino))

    def log_tails(self) -> None:
        if self._world is not None:
            self._world.log_tails()

    def close(self) -> list[str]:
        problems = self._world.close() if self._world is not None else []
        for path in self.cleanup_paths:
            remove(Path(path))
        return problems + leftovers(self)


def state_files(netns_id: int) -> list[str]:
    return glob.glob(f"/run/serval/*.net{netns_id}.*")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def leftovers(run: Run) -> list[str]:
    """What this run left on the machine, if anything."""
    from pyroute2 import netns

    found = []
    names = netns.listnetns()
    for prefix in run.lab_prefixes:
        found += [f"namespace {n}" for n in names if n.startswith(prefix + "-")]
        found += [f"file {p}" for p in glob.glob(f"/etc/netns/{prefix}-*")]
        # the daemons name their control sockets, state files and pins after the lab
        found += [f"file {p}" for p in glob.glob(f"/run/serval/{prefix}-*")]
        found += [f"pin {p}" for p in glob.glob(f"/sys/fs/bpf/serval/{prefix}-*")]
    for ino in run.netns_ids:                # and state files after their namespace
        found += [f"file {p}" for p in state_files(ino) if p not in run.not_ours]
    found += [f"file {p}" for p in run.cleanup_paths if os.path.lexists(p)]
    marks = [str(p) for p in run.cleanup_paths] + [f"{prefix}-" for prefix in run.lab_prefixes]
    for proc in glob.glob("/proc/[0-9]*/cmdline"):
        pid = int(proc.split("/")[2])
        try:
            with open(proc, "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if pid != os.getpid() and any(m in cmdline for m in marks):
            found.append(f"process {pid}: {cmdline[:80]}")
    return found


def run_step(run: Run, name: str, index: int, total: int) -> Outcome:
    title, fn, needs_world = STEPS[name]
    subject, unready = run, ""
    if needs_world:             # built under its own heading, before the first story step
        try:
            subject = run.world()
        except StepFailed as exc:
            unready = str(exc)
    heading(f"[{index}/{total}] {name}: {title}")
    t0 = time.monotonic()
    try:
        if unready:
            raise StepFailed(unready)
        shown = fn(subject)
    except StepFailed as exc:
        reason = str(exc)
    except Exception as exc:            # a lab or daemon error: the step failed, say why
        reason = first_line(exc)
        traceback.print_exc(limit=4, file=sys.stdout)
    else:
        seconds = time.monotonic() - t0
        note(f"ok ({seconds:.1f} s): {shown.measured}")
        return Outcome(name, title, True, seconds, shown.measured, by_hand=shown.by_hand)
    seconds = time.monotonic() - t0
    note(f"FAILED ({seconds:.1f} s): {reason}")
    run.log_tails()
    return Outcome(name, title, False, seconds, reason=reason)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m lab.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="steps:\n" + "\n".join(f"  {n:9} {t}" for n, (t, _, _) in STEPS.items()))
    p.add_argument("--step", action="append", choices=list(STEPS), metavar="NAME",
                   help="run only this step (may be repeated); the default is all of them")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        say("the demo builds network namespaces: run it as root")
        return 2
    names = [n for n in STEPS if n in args.step] if args.step else list(STEPS)

    main_pid = os.getpid()

    def interrupted(signum, frame):
        if os.getpid() != main_pid:
            # a forked copy of this process (pyroute2's namespace helpers are, and are
            # ended with SIGTERM): it must simply go, as without this handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Interrupted(signal.Signals(signum).name)
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)

    t0 = time.monotonic()
    run, outcomes, stopped = Run(), [], ""
    try:
        for i, name in enumerate(names, 1):
            started = time.monotonic()
            outcomes.append(run_step(run, name, i, len(names)))
    except Interrupted as exc:
        stopped = f"interrupted ({exc})"
        outcomes.append(Outcome(name, STEPS[name][0], False, time.monotonic() - started, reason=stopped))
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)       # the clean-up must finish
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        heading("cleaning up: daemons stopped (SIGTERM), namespaces removed, files deleted")
        c0 = time.monotonic()
        problems = run.close()
        for problem in problems:
            note(f"left behind: {problem}")
        outcomes.append(Outcome("cleanup", CLEANUP_TITLE, not problems, time.monotonic() - c0,
                                "daemons exited 0, their rules gone; no namespace, process, pin or file left",
                                reason="; ".join(problems[:3]) + (" …" if len(problems) > 3 else "")))
    summary(outcomes)
    by_hand(outcomes)
    failed = [o for o in outcomes if not o.ok]
    took = time.monotonic() - t0
    if stopped:
        say(f"\ndemo {stopped} after {took:.0f} s")
        return 130
    if failed:
        say(f"\ndemo FAILED ({took:.0f} s): " + "; ".join(f"{o.name}: {o.reason}" for o in failed))
        return 1
    say(f"\ndemo finished: {len(outcomes) - 1} step(s) ok, nothing left behind ({took:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
