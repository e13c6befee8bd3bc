"""A server gateway answers a SAL SYN broadcast on its subnet, as the reference's default
rule sends it (tcp_default_rule_broadcast.pcap), for real: the kernel hands a broadcast
to the queue, and the translated SYN must reach a real backend.

    cgw (a raw socket standing for a reference host) === sgw --- server
"""
import json
import sys
from pathlib import Path

from lab.gateways import RunningGateways
from lab.topologies import gateway_pair
from tests.integration.helpers import ruleset, wait_port

REPO = Path(__file__).resolve().parents[2]

# What a reference host with no service rule sends: SYN (CONTROL + SERVICE + TCP SYN with
# ports 0) to the subnet's broadcast; then it waits for a SYN|ACK naming its flowID 1.
REFERENCE_HOST = r"""
import json, os, socket, struct, sys, time
from sal import wire
from sal.ip import aton, ntoa, transport_checksum
from sal.serviceid import service_id_for

me, broadcast = sys.argv[1], sys.argv[2]
nonce, verno, isn = os.urandom(8), 1000, 5000
sal = wire.SalHeader(1, 0, 6, [wire.Control(wire.SYN, verno, 0, nonce),
                               wire.Service(service_id_for("web.svc.example", 80))]).encode()
seg = struct.pack("!HHIIBBHHH", 0, 0, isn, 0, 7 << 4, 0x02, 0, 0, 0) + bytes.fromhex("020405a801030301")
seg = seg[:16] + transport_checksum(aton(me), aton(broadcast), 6, seg, 16).to_bytes(2, "big") + seg[18:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 144)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.settimeout(1.0)
answer = None
deadline = time.monotonic() + 10
while answer is None and time.monotonic() < deadline:
    s.sendto(sal + seg, (broadcast, 0))          # again each second, as a SYN is retransmitted
    until = time.monotonic() + 1.0
    while time.monotonic() < until:
        try:
            pkt, (src, _) = s.recvfrom(4096)
        except socket.timeout:
            break
        hdr, off = wire.decode(pkt[(pkt[0] & 15) * 4:])
        ctl = hdr.control
        if hdr.dst_flow == 1 and ctl is not None and ctl.flags == wire.SYN | wire.ACK:
            tcp_ack = struct.unpack_from("!I", pkt, (pkt[0] & 15) * 4 + off + 8)[0]
            answer = {"from": src, "ackno": ctl.ackno, "tcp_ack": tcp_ack}
            break
print(json.dumps(answer))
"""


def test_a_broadcast_syn_reaches_the_backend_and_is_answered_from_our_address(lab):
    pair = gateway_pair(lab, server_route_back=False)
    before = ruleset(pair.sgw)
    gws = RunningGateways(pair)
    gws.launch("server")
    try:
        pair.server.popen([sys.executable, str(REPO / "bench" / "tiny_server.py"), "8080"])
        wait_port(pair.server, "0.0.0.0", 8080)
        broadcast = pair.sgw_sal.rsplit(".", 1)[0] + ".255"
        r = pair.cgw.run([sys.executable, "-c", REFERENCE_HOST, pair.cgw_sal, broadcast],
                         cwd=str(REPO), env={"PYTHONPATH": str(REPO)}, timeout=60)
        answer = json.loads(r.stdout)
        stats = gws.stats("server")
    finally:
        codes = gws.stop()
    assert codes == {"server": 0}, gws.log("server")
    assert ruleset(pair.sgw) == before
    # the backend took the SYN (its SYN-ACK is what the SAL SYN|ACK carries), and the
    # answer comes from our unicast address on that subnet
    assert answer == {"from": pair.sgw_sal, "ackno": 1001, "tcp_ack": 5001}, (answer, stats)
    assert stats["syn_broadcast_accepted"] == 1, stats
