"""The established flows of a translator as plain data, and back.

A gateway writes this snapshot while it runs and when it stops; started again within a
few seconds (after an upgrade, a crash, ``kill -9``) it takes its flows back, and the
legacy TCP connections through it carry on after a retransmission or two; a legacy UDP
5-tuple's next datagram goes on on the same SAL flow.

TCP flows are under ``flows``, UDP flows under ``udp_flows`` (same row, no TCP
sequence fields): a snapshot without ``udp_flows`` (an earlier version's) still reads,
and an earlier version reading this one takes its TCP flows and leaves the UDP ones.
"""
from sal.flow import SalFlow, State
from sal.ip import PROTO_UDP

from .base import Flow

VERSION = 1


def _resumable(f: Flow) -> bool:
    s = f.sal
    return (f.closed_at is None and s.state == State.ESTABLISHED and not s.migrating
            and not (f.udp is not None and (s.fin_sent or s.peer_fin       # a UDP flow closing,
                                             or f.udp.helper is not None)))   # or a helper's (tftp.py)


def _row(translator, f: Flow, now: float) -> dict:
    s = f.sal
    row = {
        "local_flow": s.local_flow, "remote_flow": s.remote_flow,
        "local_nonce": s.local_nonce.hex(), "remote_nonce": (s.remote_nonce or b"").hex(),
        "snd_nxt": s.snd_nxt, "rcv_nxt": s.rcv_nxt, "fin_sent": s.fin_sent,
        "fin_acked": s.fin_acked, "peer_fin": s.peer_fin,
        "service_id": (s.service_id or b"").hex(),
        "local_addr": f.local_addr.hex(), "peer_addr": f.peer_addr.hex(), "peer_port": f.peer_port,
        "legacy": [f.legacy_src.hex(), f.legacy_dst.hex(), f.legacy_sport, f.legacy_dport],
        "age": now - f.created, "bytes": [f.bytes_out, f.bytes_in],
    }
    if f.udp is None:
        row["legacy_last_ack"], row["legacy_fin_end"] = f.legacy_last_ack, f.legacy_fin_end
    if translator.role == "server":
        backend, _, port, peer_key = f.extra
        row["backend"] = [backend.address.hex(), backend.port, backend.source.hex(), backend.name]
        row["port"] = port
        row["peer_key"] = [peer_key[0].hex(), peer_key[1]]
    return row


def dump(translator, now: float) -> dict:
    tcp, udp = [], []
    for f in translator.flows.values():
        if _resumable(f):
            (tcp if f.udp is None else udp).append(_row(translator, f, now))
    return {"version": VERSION, "role": translator.role, "carriage": translator.carriage.name,
            "flows": tcp, "udp_flows": udp}


def _flow(row: dict, protocol: int, now: float) -> Flow:
    s = SalFlow(row["local_flow"], bytes.fromhex(row["local_nonce"]), row["snd_nxt"], protocol=protocol)
    s.remote_flow = row["remote_flow"]
    s.remote_nonce = bytes.fromhex(row["remote_nonce"]) or None
    s.rcv_nxt = row["rcv_nxt"]
    s.fin_sent, s.fin_acked, s.peer_fin = row["fin_sent"], row["fin_acked"], row["peer_fin"]
    s.service_id = bytes.fromhex(row["service_id"]) or None
    s.state = State.ESTABLISHED
    flow = Flow(s, now - row.get("age", 0))
    flow.last_seen = now
    flow.local_addr, flow.peer_addr = bytes.fromhex(row["local_addr"]), bytes.fromhex(row["peer_addr"])
    flow.peer_port = row["peer_port"]
    src, dst, sport, dport = row["legacy"]
    flow.set_legacy(bytes.fromhex(src), bytes.fromhex(dst), sport, dport)
    flow.legacy_last_ack, flow.legacy_fin_end = row.get("legacy_last_ack", 0), row.get("legacy_fin_end")
    flow.bytes_out, flow.bytes_in = row.get("bytes", [0, 0])
    return flow


def restore(translator, data: dict, now: float) -> int:
    """Put the snapshot's flows back into ``translator``; returns how many."""
    if data.get("version") != VERSION or data.get("role") != translator.role \
            or data.get("carriage", translator.carriage.name) != translator.carriage.name:
        return 0          # another kind of run: its flows cannot continue here
    restored = 0
    for rows, protocol, adopt in ((data.get("flows", []), 6, translator.adopt),
                                  (data.get("udp_flows", []), PROTO_UDP, translator.adopt_udp)):
        for row in rows:
            if row["local_flow"] in translator.flows:
                continue
            flow = _flow(row, protocol, now)
            if not adopt(flow, row):
                continue
            flow.rebuild(translator.carriage)
            restored += 1
    return restored
