"""Established flows survive a translator's restart through a snapshot."""
import json

from gateway.translate import snapshot
from tests.unit.packets import ACK, PSH, tcp_packet
from tests.unit.test_translate import (CLIENT, SERVER, SGW_LAN, VIP, check_tcp, handshake,
                                       make_pair)


def test_both_sides_resume_from_a_snapshot():
    client, server = make_pair()
    lport = handshake(client, server)
    handshake(client, server, cport=40001)
    cdata = json.loads(json.dumps(snapshot.dump(client, 5.0)))      # as written to disk
    sdata = json.loads(json.dumps(snapshot.dump(server, 5.0)))
    assert len(cdata["flows"]) == 2 and len(sdata["flows"]) == 2
    client2, server2 = make_pair()                                    # both gateways restarted
    assert snapshot.restore(client2, cdata, 6.0) == 2
    assert snapshot.restore(server2, sdata, 6.0) == 2
    assert client2.stats["flows_resumed"] == 2
    data = tcp_packet(CLIENT, 40000, VIP, 80, 1001, 5001, ACK | PSH, b"after the restart")
    out = server2.from_sal(client2.from_legacy(data, 6.1), 6.1)
    assert check_tcp(out, SGW_LAN, SERVER).dport == 8080 and out.endswith(b"after the restart")
    back = client2.from_sal(server2.from_backend(tcp_packet(SERVER, 8080, SGW_LAN, lport, 5001, 1018,
                                                           ACK, b"ok"), 6.2), 6.2)
    assert check_tcp(back, VIP, CLIENT).dport == 40000
    # the port is taken: a new connection gets another one
    new_port = handshake(client2, server2, now=6.3, cport=40009)
    assert new_port not in {r["port"] for r in sdata["flows"]}


def test_half_open_and_closed_flows_are_not_saved():
    client, server = make_pair()
    client.from_legacy(tcp_packet(CLIENT, 40005, VIP, 80, 1, flags=0x02), 0.0)
    assert snapshot.dump(client, 1.0)["flows"] == []


def test_a_snapshot_of_another_carriage_is_not_resumed():
    client, server = make_pair("ip")
    handshake(client, server)
    data = json.loads(json.dumps(snapshot.dump(client, 5.0)))
    udp_client, _ = make_pair("udp")
    assert snapshot.restore(udp_client, data, 6.0) == 0 and not udp_client.flows
    ip_client, _ = make_pair("ip")
    assert snapshot.restore(ip_client, data, 6.0) == 1
