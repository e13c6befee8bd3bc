"""Impair a path in the lab: a middle router, or a host's own link (this kernel has no netem).

- ``Delayer``: an NFQUEUE consumer run inside a namespace (the router's, or a host's for
  its own link) that holds each packet for a fixed delay, chosen by the interface it
  arrives on or leaves by, and lets them go in order; optionally a share of them later
  still (reordering). Its rules live in chains of its own and go when it stops
  (SIGTERM); packets held then go at once.
- ``Damage``: a tc-BPF program (``impair_tc.c``, compiled with clang at first use) on
  one egress of the router that drops, duplicates or corrupts packets at rates the
  caller sets and changes at any time, and counts what it did.

Both leave the namespace as they found it. Tests run the same scenario direct (plain
routed TCP, no gateways) beside the gateway pair over the same impaired path.

    python -m lab.impair delay in:IFNAME=SECONDS out:IFNAME=SECONDS ... [--reorder P]
"""
from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Where a delay applies: packets arriving on an interface ("in:eth0", the mangle table's
# PREROUTING: forwarded and local alike) or leaving by one ("out:eth0", POSTROUTING).
HOOKS = {"in": ("PREROUTING", "-i", "SV-IMPAIR-IN"), "out": ("POSTROUTING", "-o", "SV-IMPAIR-OUT")}
QUEUE_BASE = 40          # queue numbers are per namespace; far from the gateways' own
MAX_HELD = 200_000       # the kernel's queue length: packets a delay may hold at once


# --- the delayer (runs inside the namespace it delays) -----------------------------------
def _iptables(*args: str, check: bool = True) -> bool:
    r = subprocess.run(["iptables", "-w", "-t", "mangle", *args], capture_output=True, text=True)
    if check and r.returncode:
        raise RuntimeError(f"iptables {' '.join(args)}: {r.stderr.strip()}")
    return r.returncode == 0


def remove_rules() -> None:
    for hook, _, chain in HOOKS.values():
        while _iptables("-D", hook, "-j", chain, check=False):
            pass
        if _iptables("-F", chain, check=False):
            _iptables("-X", chain, check=False)


def install_rules(points) -> None:
    """One queue per point ("in:eth0", "out:eth1", ...), in the order given."""
    remove_rules()                      # a killed run's, if any
    for hook, _, chain in HOOKS.values():
        _iptables("-N", chain)
        _iptables("-I", hook, "1", "-j", chain)
    for n, point in enumerate(points):
        way, _, ifname = point.partition(":")
        _, flag, chain = HOOKS[way]
        _iptables("-A", chain, flag, ifname, "-j", "NFQUEUE", "--queue-num", str(QUEUE_BASE + n))


def parse_point(point: str) -> str:
    way, _, ifname = point.partition(":")
    if way not in HOOKS or not ifname:
        raise ValueError(f"a delay applies at in:IFNAME or out:IFNAME, not {point!r}")
    return point


def run_delayer(delays: dict[str, float], reorder: float = 0.0, reorder_extra: float = 0.005,
                seed: int | None = None) -> dict:
    """Hold packets until SIGTERM, ``delays`` seconds at each point ("in:eth0": arriving
    on eth0, "out:eth0": leaving by it); returns what was done.

    A packet's verdict is given when its time comes: with one fixed delay per point the
    packets of each are due in arrival order (a FIFO), and only reordered ones need a
    heap."""
    from netfilterqueue import COPY_META, NetfilterQueue

    rng = random.Random(seed)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    fifos: list[deque] = []
    late: list = []                     # (due, n, packet): the reordered ones
    stats = {"queued": {}, "reordered": 0, "max_held": 0, "max_late_ms": 0.0, "released": 0}
    counter = [0]
    clock = time.monotonic

    def make_callback(fifo: deque, delay: float, point: str):
        queued = stats["queued"]
        queued[point] = 0

        def callback(pkt):
            due = clock() + delay
            queued[point] += 1
            if reorder and rng.random() < reorder:
                counter[0] += 1
                heapq.heappush(late, (due + reorder_extra, counter[0], pkt))
                stats["reordered"] += 1
            else:
                fifo.append((due, pkt))
        return callback

    queues = []
    install_rules([parse_point(p) for p in delays])
    try:
        for n, (point, delay) in enumerate(delays.items()):
            fifo: deque = deque()
            q = NetfilterQueue()
            q.bind(QUEUE_BASE + n, make_callback(fifo, delay, point), max_len=MAX_HELD, mode=COPY_META,
                   range=0, sock_len=64 << 20)
            fifos.append(fifo)
            queues.append(q)
        by_fd = {q.get_fd(): q for q in queues}
        print(json.dumps({"ready": True}), flush=True)
        while not stopping:
            now = clock()
            nxt = now + 0.05
            for fifo in fifos:
                while fifo and fifo[0][0] <= now:
                    due, pkt = fifo.popleft()
                    pkt.accept()
                    stats["max_late_ms"] = max(stats["max_late_ms"], (now - due) * 1000)
                    stats["released"] += 1
                if fifo:
                    nxt = min(nxt, fifo[0][0])
            while late and late[0][0] <= now:
                due, _, pkt = heapq.heappop(late)
                pkt.accept()
                stats["released"] += 1
            if late:
                nxt = min(nxt, late[0][0])
            stats["max_held"] = max(stats["max_held"], sum(map(len, fifos)) + len(late))
            try:
                ready, _, _ = select.select(list(by_fd), [], [], max(0.0, nxt - clock()))
            except InterruptedError:
                continue
            for fd in ready:
                by_fd[fd].run(block=False)
    finally:
        remove_rules()                  # nothing new is queued; what is held goes now
        for fifo in fifos:
            for _, pkt in fifo:
                pkt.accept()
        for _, _, pkt in late:
            pkt.accept()
        for q in queues:
            q.unbind()
    return stats


class Delayer:
    """``run_delayer`` in ``host``'s namespace (a Lab Host), started and stopped;
    ``delays``: {"in:eth0": seconds, "out:eth0": seconds, ...}."""

    def __init__(self, host, delays: dict[str, float], reorder: float = 0.0, reorder_extra: float = 0.005):
        self.host, self.delays = host, dict(delays)
        self.reorder, self.reorder_extra = reorder, reorder_extra
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> "Delayer":
        argv = [sys.executable, "-m", "lab.impair", "delay",
                *(f"{point}={delay}" for point, delay in self.delays.items()),
                "--reorder", str(self.reorder), "--reorder-extra", str(self.reorder_extra)]
        self.proc = self.host.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)})
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if '"ready"' not in line:
            self.proc.kill()
            _, err = self.proc.communicate(5)
            raise RuntimeError(f"the delayer did not start: {line}{err}")
        return self

    def stop(self, timeout: float = 10.0) -> dict:
        """SIGTERM; returns its figures (packets queued per interface, reordered, most
        held at once, worst lateness of a release in ms)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return {}
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=timeout)
        if proc.returncode:
            raise RuntimeError(f"the delayer exited {proc.returncode}: {err[-2000:]}")
        return json.loads(out.strip().splitlines()[-1])

    def __enter__(self) -> "Delayer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def delay_path(pair, rtt: float, where: str = "mid", **kw) -> Delayer:
    """A Delayer adding ``rtt`` seconds to a gateway pair's round trip, half each way:
    on the middle router between the gateways (``where="mid"``, a long SAL path), or
    on the legacy client's own link (``"client"``, a satellite or mobile access link:
    the client's SYN retransmissions then reach its gateway late)."""
    if where == "client":
        return Delayer(pair.client, {f"out:{pair.client_if}": rtt / 2, f"in:{pair.client_if}": rtt / 2}, **kw)
    if pair.mid is None:
        raise ValueError("the pair has no middle router (gateway_pair(middle=True))")
    return Delayer(pair.mid, {f"in:{pair.mid_cgw_if}": rtt / 2, f"in:{pair.mid_sgw_if}": rtt / 2}, **kw)


# --- tc-BPF damage on an egress -----------------------------------------------------------
SOURCE = Path(__file__).resolve().parent / "impair_tc.c"
_CONFIG = struct.Struct("=5I")
_COUNTERS = struct.Struct("=6Q")
COUNTERS = ("seen", "dropped", "duplicated", "corrupted", "flagged", "skipped_gso")
TCP_RST, TCP_FIN = 0x04, 0x01
EGRESS = "ffff:fff3"


def _rate(p: float) -> int:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"a rate is a fraction of packets, not {p}")
    return min(int(p * 2 ** 32), 2 ** 32 - 1)


def compile_damage() -> Path:
    """``impair_tc.c`` compiled with clang, kept by the hash of its source in the temporary
    folder (so runs share one object, and an edit compiles afresh)."""
    source = SOURCE.read_bytes()
    out = Path(tempfile.gettempdir()) / "serval-impair" / f"impair_tc-{hashlib.sha256(source).hexdigest()[:16]}.o"
    if out.exists():
        return out
    clang = shutil.which("clang")
    if clang is None:
        raise RuntimeError("clang is not installed (make deps)")
    arch = subprocess.run(["gcc", "-dumpmachine"], capture_output=True, text=True).stdout.strip()
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_name(f"{out.stem}.{os.getpid()}.tmp.o")        # two runs may compile at once
    r = subprocess.run([clang, "-O2", "-g", "-Wall", "-target", "bpf", f"-I/usr/include/{arch}", "-c",
                        str(SOURCE), "-o", str(tmp)], capture_output=True, text=True)
    if r.returncode:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"compiling {SOURCE.name} failed: {r.stderr[-2000:]}")
    os.replace(tmp, out)
    return out


class Damage:
    """The damage program on ``ifname``'s egress in ``host``'s namespace. Loaded by the
    calling process (programs belong to no namespace), attached through a netlink socket
    in the host's namespace; ``set`` changes the rates while packets flow."""

    def __init__(self, host, ifname: str):
        self.host, self.ifname = host, ifname
        self.obj = None
        self.index = None
        self.added_qdisc = False

    def load(self) -> int:
        """The program in the kernel, not yet attached; returns its descriptor."""
        from gateway.fastpath.libbpf import BpfObject, Map
        self.obj = BpfObject(str(compile_damage()))
        self.config = Map(self.obj.map_fd("impair_config"), 4, _CONFIG.size)
        self.counters_map = Map(self.obj.map_fd("impair_counters"), 4, _COUNTERS.size)
        return self.obj.program_fd("impair")

    def start(self) -> "Damage":
        prog = self.load()
        try:
            with self.host.iproute() as ipr:
                index = ipr.link_lookup(ifname=self.ifname)[0]
                if not any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=index)):
                    ipr.tc("add", kind="clsact", index=index)
                    self.added_qdisc = True
                ipr.tc("add-filter", kind="bpf", index=index, handle=1, fd=prog,
                       name="serval-impair", parent=EGRESS, classid=1, direct_action=True, prio=1)
                self.index = index
        except BaseException:
            self.stop()
            raise
        return self

    def set(self, drop: float = 0.0, duplicate: float = 0.0, corrupt: float = 0.0,
            flag_share: float = 0.0, flags: int = TCP_RST) -> None:
        """Rates as fractions of packets; ``flag_share`` of the corrupted TCP packets get
        ``flags`` set instead of a random bit flipped."""
        self.config.update(b"\0\0\0\0", _CONFIG.pack(_rate(drop), _rate(duplicate), _rate(corrupt),
                                                     _rate(flag_share), flags))

    def counters(self) -> dict[str, int]:
        return dict(zip(COUNTERS, _COUNTERS.unpack(self.counters_map.lookup(b"\0\0\0\0"))))

    def stop(self) -> None:
        if self.obj is None:
            return
        try:
            if self.index is not None:          # (not when only loaded)
                with self.host.iproute() as ipr:
                    ipr.tc("del-filter", kind="bpf", index=self.index, handle=1, parent=EGRESS, prio=1)
                    if self.added_qdisc:
                        ipr.tc("del", kind="clsact", index=self.index)
        finally:
            self.index = None
            self.obj.close()
            self.obj = None

    def __enter__(self) -> "Damage":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.impair", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("delay", help="hold packets (run inside the namespace)")
    d.add_argument("delays", nargs="+", metavar="{in,out}:IFNAME=SECONDS",
                   help="delay of packets arriving on (in) or leaving by (out) IFNAME")
    d.add_argument("--reorder", type=float, default=0.0, help="share of packets held longer still")
    d.add_argument("--reorder-extra", type=float, default=0.005, help="how much longer (seconds)")
    d.add_argument("--seed", type=int)
    args = ap.parse_args(argv)
    delays = {}
    for item in args.delays:
        point, _, seconds = item.partition("=")
        delays[parse_point(point)] = float(seconds)
    print(json.dumps(run_delayer(delays, args.reorder, args.reorder_extra, args.seed)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
