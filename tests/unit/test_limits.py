"""Caps on flows: per source, half-open (oldest evicted), total, held packets."""
from gateway.translate import Timeouts
from gateway.translate.limits import Limits
from sal.ip import aton
from tests.unit.packets import SYN, tcp_packet
from tests.unit.test_translate import CLIENT, VIP, handshake, make_pair


def syn(src, port):
    return tcp_packet(src, port, VIP, 80, 1000, flags=SYN)


def test_per_source_cap_evicts_that_source_s_oldest_handshake_then_refuses():
    client, server = make_pair()
    client.limits = Limits(max_flows_per_source=3)
    for port in range(40000, 40005):
        client.from_legacy(syn(CLIENT, port), 0.0)
    assert len(client.flows) == 3 and client.stats["limit_half_open_evicted"] == 2
    assert {f.legacy_sport for f in client.flows.values()} == {40002, 40003, 40004}
    assert client.from_legacy(syn("198.19.1.3", 40000), 0.0) is not None   # another source is served
    # once a source's flows are all established, its next one is refused
    client2, server2 = make_pair()
    client2.limits = Limits(max_flows_per_source=2)
    handshake(client2, server2, cport=41000)
    handshake(client2, server2, cport=41001)
    assert client2.from_legacy(syn(CLIENT, 41002), 0.0) is None
    assert client2.stats["limit_flows_per_source"] == 1


def test_a_flood_through_one_client_gateway_does_not_lock_out_its_legitimate_clients():
    client, server = make_pair()
    server.limits = Limits(max_flows_per_source=50, max_half_open=1000)   # one SAL peer
    for i in range(500):
        server.from_sal(client.from_legacy(syn(f"198.19.{100 + i // 250}.{i % 250 + 1}", 1000 + i), 0.0), 0.0)
    assert server.stats["limit_flows_per_source"] == 0 and len(server.flows) == 50
    handshake(client, server, now=0.1, cport=50000)


def test_half_open_flood_evicts_the_oldest_and_a_real_handshake_completes():
    client, server = make_pair()
    client.limits = server.limits = Limits(max_half_open=100)
    for i in range(1000):                                 # spoofed sources, never answered
        sal_syn = client.from_legacy(syn(f"198.19.{100 + i // 250}.{i % 250 + 1}", 1000 + i), 0.0)
        server.from_sal(sal_syn, 0.0)
    assert len(client.flows) == 100 and client.stats["limit_half_open_evicted"] == 900
    assert len(server.flows) == 100 and server.stats["limit_half_open_evicted"] == 900
    handshake(client, server, now=0.1, cport=50000)      # a legitimate client still gets through
    assert client.stats["flows_established"] == 1
    # an established flow is no longer half-open: a further flood does not evict it
    for i in range(500):
        server.from_sal(client.from_legacy(syn("198.19.200.1", 2000 + i), 0.2), 0.2)
    assert any(f.sal.state.value == "established" for f in client.flows.values())
    assert any(f.sal.state.value == "established" for f in server.flows.values())


def test_total_cap_when_nothing_is_half_open():
    client, server = make_pair()
    client.limits = Limits(max_flows=2, max_half_open=10)
    handshake(client, server, cport=40001)
    handshake(client, server, cport=40002)
    assert client.from_legacy(syn(CLIENT, 40003), 0.0) is None
    assert client.stats["limit_flows"] == 1


def test_held_packets_are_capped_across_flows():
    from tests.unit.test_migration import legacy_data
    client, server = make_pair()
    client.limits = Limits(max_held_packets=10)
    handshake(client, server)
    client.migrate(1.0, aton("198.19.5.1"))
    for i in range(20):
        client.from_legacy(legacy_data(1001 + i), 1.0)
    assert client.stats["packets_held"] == 10 and client.stats["limit_held_packets"] == 10


def test_caps_are_released_when_flows_go():
    client, _ = make_pair()
    client.timeouts = Timeouts(handshake=1.0)
    client.limits = Limits(max_flows_per_source=2)
    client.from_legacy(syn(CLIENT, 40000), 0.0)
    client.from_legacy(syn(CLIENT, 40001), 0.0)
    client.handle_timer(2.0)                              # both handshakes expire
    assert client.flows == {} and client._per_source == {} and not client._half_open
    assert client.from_legacy(syn(CLIENT, 40002), 2.0) is not None


def test_server_eviction_resets_the_backend_half_open_connection():
    from sal.ip import IPv4, TCP
    client, server = make_pair()
    server.limits = Limits(max_half_open=1)
    first = client.from_legacy(syn("198.19.1.9", 41000), 0.0)
    to_backend = server.from_sal(first, 0.0)
    server.from_sal(client.from_legacy(syn("198.19.1.9", 41001), 0.0), 0.0)   # evicts the first
    (rst,) = server.outbox
    t, sent = TCP(rst[20:]), TCP(to_backend[20:])
    assert IPv4(rst).dst == aton("198.19.3.2") and t.flags == 0x04
    assert (t.sport, t.dport, t.seq) == (sent.sport, sent.dport, sent.seq + 1)


def test_closed_flows_do_not_count_against_their_source_and_a_refusal_answers():
    """A busy client closing connections as fast as it opens them is never capped by
    flows that are only lingering; a SYN a cap refuses is answered with a RST."""
    from tests.unit.packets import ACK, FIN, RST
    client, server = make_pair()
    client.limits = Limits(max_flows_per_source=2)
    for port in (42000, 42001):
        handshake(client, server, cport=port)
        client.from_legacy(tcp_packet(CLIENT, port, VIP, 80, 1001, 5001, RST | ACK), 1.0)
    assert len(client.flows) == 2 and all(f.closed_at is not None for f in client.flows.values())
    handshake(client, server, cport=42002)            # lingering ones do not count
    handshake(client, server, cport=42003)
    client.outbox.clear()
    assert client.from_legacy(syn(CLIENT, 42004), 1.0) is None             # two live: the cap
    (rst,) = client.outbox
    assert rst[33] == RST | ACK and rst[16:20] == aton(CLIENT)
    assert client.stats["limit_flows_per_source"] == 1 and client.stats["legacy_resets_sent"] >= 1


def test_a_server_gateway_cap_refuses_with_a_reset_the_legacy_client_hears():
    """Every flow of the client gateway established, its cap reached at the server
    gateway: the next SAL SYN gets a RST, and the legacy client a RST that answers its
    SYN (before: dropped silently, the connect hung through its retransmissions)."""
    client, server = make_pair()
    server.limits = Limits(max_flows_per_source=2)
    handshake(client, server, cport=41000)
    handshake(client, server, cport=41001)
    assert server.from_sal(client.from_legacy(syn(CLIENT, 41002), 0.0), 0.0) is None
    assert server.stats["limit_flows_per_source"] == 1 and server.stats["refused_flow_cap"] == 1
    (sal_rst,) = server.outbox
    server.outbox.clear()
    client.from_sal(sal_rst, 0.0)
    (legacy_rst,) = client.outbox
    assert legacy_rst[33] & 0x04 and int.from_bytes(legacy_rst[28:32], "big") == 1001   # RST, acks the SYN
