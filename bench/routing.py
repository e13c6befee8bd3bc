"""Benchmark of service routing and failover: ``python -m bench.routing``.

One ``routed_replicas`` lab (two routers, two replicas with weights 1 and 3, the same
knobs as the tests: refresh 50 ms / hold 200 ms, router probes 50 ms x 3, backend checks
100 ms with rise/fall 2). Each number is measured there:

``failover_ms_backend_kill``, ``failover_ms_gateway_kill``
    The client opens a new connection every 5 ms (open loop; each connection: connect,
    one request, one reply, within 0.5 s). ``kill -9`` of replica 0's backend, or of its
    whole server gateway; the value is the time from the kill to the start of the LAST
    connection that failed: from then on every new connection succeeds. The worst of
    ``--trials`` runs (the replica is restarted and re-registered between runs).
    ``*_first_success`` is the time from the kill to the first success of a connection
    started after it (small: the other replica keeps answering throughout).
``router_syn_forward_per_second``
    Bursts of 10,000 SAL SYNs (raw socket, distinct flowIDs, sent about 5x faster than a
    router can take them: the excess is dropped at its queue) from the client gateway's
    namespace to one router, for a service registered at a blackholed address; the rate
    at which forwarded SYNs leave the router, from the kernel timestamps of a capture on
    the far side (first to last forwarded SYN of a burst); the median of 3 bursts.
``registration_propagation_ms``
    A REGISTER sent from a server gateway's namespace until the router's ACK is back
    (the router acknowledges after its table changed): the median of 200, each a change.
``drain_propagation_ms``
    End to end: ``serval ctl drain`` (or its cancel) at a server gateway until the router's
    table shows the change, polled over the router's control socket: median of 20.

Prints a table and merges the records into ``build/bench.json`` (records with the same
metric names are replaced). The lab is always torn down.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.records import merge
from lab.routed import Knobs, RoutedDeployment, start_backend, start_client
from lab.topologies import routed_replicas
from lab.topology import Lab
from sal import pcap

REPO = Path(__file__).resolve().parent.parent
SINK = "198.19.99.1"          # a blackholed instance address (in core) for the SYN rate
GOALS = {"failover_ms_gateway_kill": 300, "failover_ms_backend_kill": 1000}
REFERENCE = "HAProxy's default checks notice a dead server after ~6 s (inter 2 s x fall 3); nginx's passive max_fails/fail_timeout after 10 s"


def progress(msg: str) -> None:
    print(f"[bench.routing] {msg}", file=sys.stderr, flush=True)


def failover_trial(dep: RoutedDeployment, kill, seconds=2.5, kill_after=0.8, rate=200) -> dict:
    loop = start_client(dep.topo.client, "loop", seconds, rate, 0.5)
    time.sleep(kill_after)
    t_kill = kill()
    out, err = loop.communicate(timeout=seconds + 30)
    if loop.returncode:
        raise RuntimeError(f"load client failed: {err[-1000:]}")
    attempts = json.loads(out)
    failed = [a for a in attempts if a[2] is None]
    after_ok = [a[1] for a in attempts if a[0] >= t_kill and a[2]]
    return {"attempts": len(attempts), "failed": len(failed),
            "last_failure_ms": (max(a[0] for a in failed) - t_kill) * 1000 if failed else 0.0,
            "first_success_ms": (min(after_ok) - t_kill) * 1000 if after_ok else None}


def backend_kill(dep: RoutedDeployment) -> dict:
    def kill():
        dep.backends[0].kill()
        return time.monotonic()
    result = failover_trial(dep, kill)
    dep.backends[0].wait()
    dep.backends[0] = start_backend(dep.topo.servers[0], "srv0")
    dep.wait_registered(2)
    return result


def gateway_kill(dep: RoutedDeployment) -> dict:
    result = failover_trial(dep, lambda: dep.kill("sgw0"))
    dep.launch("sgw0")
    dep.wait_up("sgw0")
    dep.wait_registered(2)
    return result


# run in a namespace (PYTHONPATH=REPO): control-plane clients speaking sal.registration
_REGISTRAR_PY = r'''
import json, socket, sys, time
from sal import registration as reg
from sal.ip import aton
from sal.serviceid import ServicePrefix, service_id_for
mode, router, key_hex = sys.argv[1], sys.argv[2], sys.argv[3]
signer = reg.Signer(reg.Key("deployment", bytes.fromhex(key_hex)), "bench-" + mode)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
def send(kind, address, records, hold_ms=60000):
    fields = {"address": aton(address), "records": records}
    if kind == reg.REGISTER: fields["hold_ms"] = hold_ms
    data, msg = signer.message(kind, time.time_ns(), **fields)
    t = time.perf_counter(); s.sendto(data, (router, reg.DEFAULT_PORT))
    while True:
        reply = signer.check_reply(s.recv(2048))
        if reply.acked_seq == msg.seq:
            return (time.perf_counter() - t) * 1000, reply.status
if mode == "sink":             # sink NAME: register NAME:1 at the blackholed address
    print(json.dumps(send(reg.REGISTER, sys.argv[5], [reg.Record(sys.argv[4], ServicePrefix(service_id_for(sys.argv[4], 1)))])))
elif mode == "unsink":
    print(json.dumps(send(reg.UNREGISTER, sys.argv[5], [])))
elif mode == "propagation":    # propagation N ADDRESS: N registrations, each a change
    out = []
    for i in range(int(sys.argv[4])):
        out.append(send(reg.REGISTER, sys.argv[5], [reg.Record(f"bench.prop{i}", ServicePrefix(service_id_for(f"bench.prop{i}", 1)))])[0])
    send(reg.UNREGISTER, sys.argv[5], [])
    print(json.dumps(out))
'''

_SYN_BLAST_PY = r'''
import socket, struct, sys, time
from sal import wire
from sal.serviceid import service_id_for
from sal.checksum import checksum
src, router, name, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sid = service_id_for(name, 1)
seg = struct.pack("!HHIIBBHHH", 0, 0, 1000, 0, 0x50, 0x02, 65535, 0, 0)
packets = []
for i in range(n):
    body = wire.SalHeader(i + 1, 0, 6, [wire.Control(wire.SYN, 1, 0, b"benchnon"), wire.Service(sid)]).encode() + seg
    packets.append(body)
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 144)
t = time.perf_counter()
for p in packets:
    s.sendto(p, (router, 0))
print(n / (time.perf_counter() - t))
'''


def in_ns(host, code: str, *args, timeout=60) -> str:
    r = host.run([sys.executable, "-c", code, *map(str, args)], check=False, timeout=timeout, cwd=str(REPO),
                 env={**os.environ, "PYTHONPATH": str(REPO)})
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return r.stdout


def syn_forward_rate(dep: RoutedDeployment, n: int = 10000, bursts: int = 3) -> dict:
    topo, router = dep.topo, dep.topo.router_addr(0)
    topo.core.run(["ip", "route", "replace", "blackhole", "198.19.99.0/24"])
    in_ns(topo.cgw, _REGISTRAR_PY, "sink", router, dep.key, "bench.sink", SINK)
    capture = dep.dir / "forwarded.pcap"
    dump = topo.core.popen(["tcpdump", "-U", "-B", "65536", "-s", "96", "-i", "any", "-y", "LINUX_SLL", "-w", str(capture),
                            f"ip proto 144 and dst host {SINK}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    before = dep.ctl("r0", "stats")
    for _ in range(bursts):
        in_ns(topo.cgw, _SYN_BLAST_PY, topo.cgw_sal, router, "bench.sink", n)
        dep.wait_for(lambda: _settled(dep, "r0"), 20, "router to drain its queue")
        time.sleep(0.3)
    dump.terminate()
    dump.wait(10)
    after = dep.ctl("r0", "stats")
    in_ns(topo.cgw, _REGISTRAR_PY, "unsink", router, dep.key, "x", SINK)
    stamps = [ts for ts, pkt in pcap.read_pcap(capture.read_bytes()) if pkt]
    groups, rates = [[]], []
    for ts in stamps:                     # one group per burst: split at the quiet gaps
        if groups[-1] and ts - groups[-1][-1] > 0.2:
            groups.append([])
        groups[-1].append(ts)
    rates = [(len(g) - 1) / (g[-1] - g[0]) for g in groups if len(g) > 100]
    return {"rate": statistics.median(rates) if rates else 0.0, "rates": [round(r) for r in rates],
            "captured": len(stamps), "forwarded": after.get("syn_forwarded", 0) - before.get("syn_forwarded", 0),
            "sent": n * bursts, "queue_dropped": after.get("kernel_queue_dropped", 0) - before.get("kernel_queue_dropped", 0)}


_last = {}


def _settled(dep, name) -> bool:
    count = dep.ctl(name, "stats").get("syn_forwarded", 0)
    done = _last.get(name) == count
    _last[name] = count
    time.sleep(0.1)
    return done


def propagation(dep: RoutedDeployment, n: int = 200) -> list[float]:
    out = in_ns(dep.topo.sgws[0], _REGISTRAR_PY, "propagation", dep.topo.router_addr(0), dep.key, n, "198.19.98.1")
    return json.loads(out)


def drain_propagation(dep: RoutedDeployment, rounds: int = 10) -> list[float]:
    """``drain`` at a server gateway until the router no longer lists the instance, and
    back (control socket to control socket; polled, so within about a millisecond)."""
    gone = dep.topo.sgw_sal(0)
    out = []
    for i in range(2 * rounds):
        cancel = bool(i % 2)
        t = time.perf_counter()
        dep.ctl("sgw0", "drain", service="web.svc.example", cancel=cancel)
        deadline = t + 5
        while (gone in dep.instances("r0")) != cancel:
            if time.perf_counter() > deadline:
                raise RuntimeError("drain never reached the router")
        out.append((time.perf_counter() - t) * 1000)
    return out


def record(metric, value, unit, baseline=None, base_value=None):
    return {"metric": metric, "value": value, "unit": unit, "baseline": baseline,
            "ratio": value / base_value if base_value else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=3, help="failover runs of each kind (default 3)")
    ap.add_argument("--output", default=str(REPO / "build" / "bench.json"))
    args = ap.parse_args(argv)
    results: dict = {}
    with Lab() as lab:
        topo = routed_replicas(lab)
        dep = RoutedDeployment(topo, Knobs())
        dep.backends = {i: start_backend(topo.servers[i], f"srv{i}") for i in range(2)}
        try:
            progress("starting routers and gateways")
            dep.start()
            dep.wait_registered(2)
            for kind, run in (("backend", backend_kill), ("gateway", gateway_kill)):
                trials = []
                for i in range(args.trials):
                    trials.append(run(dep))
                    progress(f"{kind} kill {i + 1}/{args.trials}: {trials[-1]}")
                results[kind] = trials
            progress("SYN forwarding rate")
            results["syn"] = syn_forward_rate(dep)
            progress(str(results["syn"]))
            results["propagation"] = propagation(dep)
            results["drain"] = drain_propagation(dep)
            codes = dep.stop_all()
            if set(codes.values()) != {0}:
                raise RuntimeError(f"unclean exits: {codes}")
        finally:
            for name in list(dep.procs):
                dep.kill(name)
    records = []
    for kind in ("backend", "gateway"):
        trials = results[kind]
        records.append(record(f"failover_ms_{kind}_kill", max(t["last_failure_ms"] for t in trials), "ms"))
        firsts = [t["first_success_ms"] for t in trials if t["first_success_ms"] is not None]
        records.append(record(f"failover_ms_{kind}_kill_first_success", statistics.median(firsts), "ms"))
        records.append(record(f"failover_failed_connections_{kind}_kill", max(t["failed"] for t in trials), "connections"))
    records.append(record("router_syn_forward_per_second", results["syn"]["rate"], "SYN/s"))
    records.append(record("registration_propagation_ms", statistics.median(results["propagation"]), "ms"))
    records.append(record("registration_propagation_p99_ms",
                          sorted(results["propagation"])[int(len(results["propagation"]) * 0.99) - 1], "ms"))
    records.append(record("drain_propagation_ms", statistics.median(results["drain"]), "ms"))
    print(f"{'metric':44} {'value':>12}  unit         goal")
    for r in records:
        goal = GOALS.get(r["metric"])
        v = r["value"]
        value = f"{v:12d}" if isinstance(v, int) else f"{v:12.1f}" if abs(v) >= 10 else f"{v:12.3f}"
        print(f"{r['metric']:44} {value}  {r['unit']:12} {'< %d ms' % goal if goal else ''}")
    print(f"\nfailover: worst of {args.trials} runs, kill -> start of the last failed connection "
          f"(a new connection every 5 ms, 0.5 s each).\nFor comparison: {REFERENCE}.")
    merge(records, Path(args.output))
    print(f"merged {len(records)} records into {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
