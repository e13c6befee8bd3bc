"""UDP toward a virtual address:port with no UDP service behind it (here, only the TCP
web service is configured): the sender is told at once (ICMP port unreachable,
ECONNREFUSED on a connected socket), instead of waiting for an answer that cannot come;
its other UDP (here, to the server directly) is untouched. UDP services are carried:
test_udp_flows_lab.py."""
import sys

from lab.gateways import VIRTUAL_ADDR, RunningGateways
from lab.topologies import gateway_pair

ASK_PY = r'''
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.connect((sys.argv[1], int(sys.argv[2])))
start = time.monotonic()
s.send(b"anyone?")
try:
    print("answer", s.recv(100).decode())
except ConnectionRefusedError:
    print("refused")
except socket.timeout:
    print("timeout")
'''

ECHO_PY = r'''
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 5300))
while True:
    data, addr = s.recvfrom(100)
    s.sendto(b"echo " + data, addr)
'''


def test_a_datagram_to_a_virtual_address_is_refused_at_once(lab):
    pair = gateway_pair(lab)
    pair.server.popen([sys.executable, "-c", ECHO_PY])
    with RunningGateways(pair).start() as gws:
        r = pair.client.run([sys.executable, "-c", ASK_PY, VIRTUAL_ADDR, "53"], timeout=20)
        assert r.stdout.split() == ["refused"]
        stats = gws.stats("client")
        assert stats["dropped_udp_not_carried"] >= 1 and stats["icmp_port_unreachable_sent"] >= 1
        # UDP that is not toward the virtual range passes as before
        r = pair.client.run([sys.executable, "-c", ASK_PY, pair.server_addr, "5300"], timeout=20)
        assert r.stdout.split() == ["answer", "echo", "anyone?"]
