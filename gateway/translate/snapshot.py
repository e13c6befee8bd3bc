"""The established flows of a translator as plain data, and back.

A gateway writes this snapshot while it runs and when it stops; started again within a
few seconds (after an upgrade, a crash, ``kill -9``) it takes its flows back, and the
legacy TCP connections through it carry on after a retransmission or two.
"""
from sal.flow import SalFlow, State

from .base import Flow

VERSION = 1


def dump(translator, now: float) -> dict:
    flows = []
    for f in translator.flows.values():
        if f.closed_at is not None or f.sal.state != State.ESTABLISHED or f.sal.migrating \
                or f.udp is not None:      # (UDP flows are not resumed yet: their next datagram opens anew)
            continue
        s = f.sal
        row = {
            "local_flow": s.local_flow, "remote_flow": s.remote_flow,
            "local_nonce": s.local_nonce.hex(), "remote_nonce": (s.remote_nonce or b"").hex(),
            "snd_nxt": s.snd_nxt, "rcv_nxt": s.rcv_nxt, "fin_sent": s.fin_sent,
            "fin_acked": s.fin_acked, "peer_fin": s.peer_fin,
            "service_id": (s.service_id or b"").hex(),
            "local_addr": f.local_addr.hex(), "peer_addr": f.peer_addr.hex(), "peer_port": f.peer_port,
            "legacy": [f.legacy_src.hex(), f.legacy_dst.hex(), f.legacy_sport, f.legacy_dport],
            "legacy_last_ack": f.legacy_last_ack, "legacy_fin_end": f.legacy_fin_end,
            "age": now - f.created, "bytes": [f.bytes_out, f.bytes_in],
        }
        if translator.role == "server":
            backend, _, port, peer_key = f.extra
            row["backend"] = [backend.address.hex(), backend.port, backend.source.hex(), backend.name]
            row["port"] = port
            row["peer_key"] = [peer_key[0].hex(), peer_key[1]]
        flows.append(row)
    return {"version": VERSION, "role": translator.role, "carriage": translator.carriage.name, "flows": flows}


def restore(translator, data: dict, now: float) -> int:
    """Put the snapshot's flows back into ``translator``; returns how many."""
    if data.get("version") != VERSION or data.get("role") != translator.role \
            or data.get("carriage", translator.carriage.name) != translator.carriage.name:
        return 0          # another kind of run: its flows cannot continue here
    restored = 0
    for row in data.get("flows", []):
        if row["local_flow"] in translator.flows:
            continue
        s = SalFlow(row["local_flow"], bytes.fromhex(row["local_nonce"]), row["snd_nxt"])
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
        flow.legacy_last_ack, flow.legacy_fin_end = row["legacy_last_ack"], row["legacy_fin_end"]
        flow.bytes_out, flow.bytes_in = row.get("bytes", [0, 0])
        if not translator.adopt(flow, row):
            continue
        flow.rebuild(translator.carriage)
        restored += 1
    return restored
