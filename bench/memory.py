"""Memory per flow of the translators: ``python -m bench.memory [--flows 100000]``.

A client and a server translator, back to back in memory, open ``--flows`` real
connections each the way the daemons do (the legacy SYN through ``from_legacy``, the
SAL SYN through the server's ``from_sal``, the backend's SYN-ACK through
``from_backend``, the SAL SYN|ACK through the client's ``from_sal``, the legacy ACK and
the SAL ACK that completes the handshake), so that every flow ends ESTABLISHED on both
sides, holding what an established flow holds. Memory is counted with tracemalloc:
each side's share is what is freed when that side's flow tables are emptied (its
Flow and SalFlow objects, keys, headers, deltas, table and timer entries), so state
shared by all flows (port pools, configuration) is not counted.

Prints ``memory_bytes_per_flow`` for each side and merges the records
``{"metric","value","unit","baseline","ratio"}`` into ``build/bench.json`` (same
metric names replaced). No root needed.
"""
from __future__ import annotations

import argparse
import gc
import random
import struct
import sys
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gateway.translate import Backend, ClientTranslator, ServerTranslator  # noqa: E402
from gateway.translate.carriage import ip_header, make_carriage  # noqa: E402
from gateway.translate.limits import Limits  # noqa: E402
from sal.ip import aton, transport_checksum  # noqa: E402
from sal.serviceid import ServicePrefix, service_id_for  # noqa: E402
from sal.service_table import Action, ServiceTable  # noqa: E402
from bench.records import merge  # noqa: E402

VIP, CGW, SGW, SGW_LAN, SERVER = (aton(a) for a in ("198.18.0.10", "198.19.2.1", "198.19.2.2", "198.19.3.1", "198.19.3.2"))
SIDS = (service_id_for("web.svc.example", 80), service_id_for("web.svc.example", 81))
SYN, ACK = 0x02, 0x10


def _tcp(src, sport, dst, dport, seq, ack, flags, mss=None) -> bytearray:
    opts = b"" if mss is None else struct.pack("!BBH", 2, 4, mss)
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (20 + len(opts)) // 4 << 4, flags, 65535, 0, 0) + opts
    seg = seg[:16] + transport_checksum(src, dst, 6, seg, 16).to_bytes(2, "big") + seg[18:]
    return bytearray(ip_header(src, dst, 6, 20 + len(seg), 1, 64, 0, 0x4000) + seg)


def make_pair(flows: int, carriage: str = "ip"):
    """A pair that admits ``flows`` connections from one client gateway: per-source and
    table caps raised, two backends (a pool of 64512 ports each)."""
    limits = Limits(max_flows=2 * flows + 16, max_flows_per_source=2 * flows + 16)
    ctable = ServiceTable(random.Random(1))
    for sid in SIDS:
        ctable.add(ServicePrefix(sid), Action.FORWARD, "198.19.2.2")
    vmap = {(VIP, 80): SIDS[0], (VIP, 81): SIDS[1]}
    client = ClientTranslator(CGW, lambda a, p: vmap.get((a, p)), ctable, make_carriage(carriage, "client"),
                              rng=random.Random(2), limits=limits)
    stable = ServiceTable(random.Random(3))
    stable.add(ServicePrefix(SIDS[0]), Action.DEMUX, Backend(SERVER, 8080, SGW_LAN))
    stable.add(ServicePrefix(SIDS[1]), Action.DEMUX, Backend(SERVER, 8081, SGW_LAN))
    server = ServerTranslator(stable, make_carriage(carriage, "server"), port_range=(1024, 65535),
                              rng=random.Random(4), limits=limits)
    return client, server


class Opener:
    """Opens connections through the pair from packet templates (ports and addresses
    patched in; the translators do not verify the legacy TCP checksum on input)."""

    def __init__(self, client, server):
        self.client, self.server = client, server
        self.syn = _tcp(aton("198.19.1.2"), 1024, VIP, 80, 1000, 0, SYN, 1460)
        self.ack = _tcp(aton("198.19.1.2"), 1024, VIP, 80, 1001, 5001, ACK)
        self.synack = _tcp(SERVER, 8080, SGW_LAN, 1024, 5000, 1001, SYN | ACK, 1460)
        self.count = 0

    def open(self, now: float = 0.0) -> None:
        i = self.count
        self.count += 1
        host = aton(f"198.19.{1 + i // 64000 // 250}.{2 + i // 64000 % 250}")
        sport, dport = 1024 + i % 64000, 80 + (i & 1)
        syn, ack, synack = self.syn, self.ack, self.synack
        syn[12:16] = ack[12:16] = host
        struct.pack_into("!HH", syn, 20, sport, dport)
        struct.pack_into("!HH", ack, 20, sport, dport)
        sal_syn = self.client.from_legacy(bytes(syn), now)
        to_backend = self.server.from_sal(sal_syn, now)
        struct.pack_into("!HH", synack, 20, 8080 + (i & 1), struct.unpack_from("!H", to_backend, 20)[0])
        sal_synack = self.server.from_backend(bytes(synack), now)
        self.client.from_sal(sal_synack, now)
        sal_ack = self.client.from_legacy(bytes(ack), now)
        if self.server.from_sal(sal_ack, now) is None:
            raise RuntimeError("the handshake's ACK did not reach the backend")
        self.client.events.clear()      # drained, as the daemon does after each batch
        self.server.events.clear()


def _flow_state(t) -> list:
    """Everything a translator keeps per flow (emptied to measure what it held)."""
    names = ("flows", "by_legacy", "by_peer", "by_backend", "_expiry", "_half_open", "_per_source",
             "_retransmitting", "_rtx_heap", "_holding")
    return [getattr(t, n) for n in names if hasattr(t, n)]


def measure(flows: int = 100_000, carriage: str = "ip") -> dict:
    client, server = make_pair(flows, carriage)
    opener = Opener(client, server)
    for _ in range(4):              # pools, caches, first-use allocations: not per flow
        opener.open()
    gc.collect()
    started = time.perf_counter()
    tracemalloc.start()
    try:
        for _ in range(flows):
            opener.open()
        seconds = time.perf_counter() - started
        established = [sum(f.sal.state.value == "established" for f in t.flows.values()) for t in (client, server)]
        client.outbox.clear()
        server.outbox.clear()
        gc.collect()
        full = tracemalloc.get_traced_memory()[0]
        for table in _flow_state(client):
            table.clear()
        gc.collect()
        no_client = tracemalloc.get_traced_memory()[0]
        for table in _flow_state(server):
            table.clear()
        gc.collect()
        neither = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    total = flows + 4
    return {"flows": flows, "carriage": carriage, "seconds": seconds, "established": established,
            "client": (full - no_client) / total, "server": (no_client - neither) / total}


def kernel_bytes_per_flow(flows_map, legacy_map, map_ids: set, flows: int = 20_000) -> float:
    """What ``flows`` entries add to the two hash maps' memory, as the kernel reports
    it (bpftool's bytes_memlock is the map's actual use since Linux 6.4), per flow."""
    import json
    import subprocess
    from gateway.fastpath import maps

    def used():
        total = 0
        for m in json.loads(subprocess.run(["bpftool", "-j", "map", "show"], capture_output=True,
                                           text=True, check=True).stdout):
            if m.get("name") in ("serval_flows", "serval_legacy") and m.get("id") in map_ids:
                total += int(m["bytes_memlock"])
        return total

    base = used()
    value = bytes(maps.FLOW.size)
    for i in range(1, flows + 1):
        key = maps.FLOW_KEY.pack(0x7000_0000 + i)
        flows_map.update(key, value)
        legacy_map.update(maps.LEGACY_KEY.pack(key, b"\0\0\0\1", b"\0\1", b"\0\2", 6), key)
    grown = used() - base
    for i in range(1, flows + 1):
        key = maps.FLOW_KEY.pack(0x7000_0000 + i)
        flows_map.delete(key)
        legacy_map.delete(maps.LEGACY_KEY.pack(key, b"\0\0\0\1", b"\0\1", b"\0\2", 6))
    return grown / flows



def kernel_flow_bytes() -> float | None:
    """The fast path's kernel memory per flow, with a freshly loaded program (root)."""
    from gateway.fastpath import build, maps
    from gateway.fastpath.libbpf import BpfError, BpfObject, Map, prog_map_ids
    try:
        obj = BpfObject(str(build.object_path()))
    except (BpfError, build.BuildError) as exc:
        print(f"  (no kernel figure: {exc})")
        return None
    try:
        flows = Map(obj.map_fd("serval_flows"), 4, maps.FLOW.size)
        legacy = Map(obj.map_fd("serval_legacy"), maps.LEGACY_KEY.size, 4)
        return kernel_bytes_per_flow(flows, legacy, set(prog_map_ids(obj.program_fd("serval_ingress"))))
    finally:
        obj.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--flows", type=int, default=100_000)
    ap.add_argument("--carriage", choices=("ip", "udp"), default="ip")
    ap.add_argument("--json", default=str(REPO / "build" / "bench.json"), help="records file to merge into")
    args = ap.parse_args(argv)
    if not 1000 <= args.flows <= 1_000_000:
        ap.error("--flows between 1000 and 1000000")
    res = measure(args.flows, args.carriage)
    print(f"{args.flows} established flows on each side ({args.carriage} carriage), opened in "
          f"{res['seconds']:.1f} s under tracemalloc")
    print(f"  memory_bytes_per_flow_client  {res['client']:8.0f} B")
    print(f"  memory_bytes_per_flow_server  {res['server']:8.0f} B")
    records = [
        # the single figure: the costlier side of a translated flow
        {"metric": "memory_bytes_per_flow", "value": round(max(res["client"], res["server"]), 1), "unit": "B",
         "baseline": None, "ratio": None},
        {"metric": "memory_bytes_per_flow_client", "value": round(res["client"], 1), "unit": "B",
         "baseline": None, "ratio": None},
        {"metric": "memory_bytes_per_flow_server", "value": round(res["server"], 1), "unit": "B",
         "baseline": None, "ratio": None},
    ]
    kernel = kernel_flow_bytes()
    if kernel is not None:
        print(f"  fastpath_kernel_bytes_per_flow {kernel:7.0f} B  (both hash maps, as the kernel counts them)")
        records.append({"metric": "fastpath_kernel_bytes_per_flow", "value": round(kernel, 1), "unit": "B",
                        "baseline": None, "ratio": None})
    merge(records, Path(args.json))
    print(f"merged into {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
