"""The server gateway's (source address, port) pairs toward a backend: reused as soon as
TCP lets the backend take a new connection on the same 4-tuple, on a fake clock."""
import random

import pytest

from gateway.translate import Backend, ClientTranslator, ServerTranslator
from gateway.translate.carriage import make_carriage
from gateway.translate.ports import TIME_WAIT, PortPool
from sal.flow import State
from sal.ip import TCP, aton
from sal.serviceid import ServicePrefix
from sal.service_table import Action, ServiceTable
from tests.unit.packets import ACK, FIN, RST, SYN, tcp_packet
from tests.unit.test_translate import CGW, CLIENT, SERVER, SGW, SGW_LAN, SID, VIP

A, B = aton("198.19.3.1"), aton("198.19.3.5")


# --- the pool alone --------------------------------------------------------------------

def test_every_pair_once_from_a_random_place_alternating_sources():
    pool = PortPool(20000, 20009, [A, B], rng=random.Random(7))
    pairs = [pool.take(0.0) for _ in range(20)]
    assert pool.take(0.0) is None
    assert sorted(pairs) == sorted((s, p) for s in (A, B) for p in range(20000, 20010))
    assert pairs[0] != (A, 20000), "the walk starts at a random place"
    assert all(pairs[i][0] != pairs[i + 1][0] for i in range(19)), "a burst spreads over both sources"
    assert pool.free == []


def test_a_pair_given_back_at_once_is_reused_before_any_fresh_one():
    pool = PortPool(20000, 20999, [A])
    first = pool.take(0.0)
    owner = object()
    pool.leased[first] = owner
    assert pool.release(first, owner, 1.0)
    assert pool.take(1.0) == first


def test_a_pair_in_time_wait_waits_for_it():
    pool = PortPool(20000, 20001, [A])
    one, two = pool.take(0.0), pool.take(0.0)
    pool.leased[one] = pool.leased[two] = "flow"
    pool.release(one, "flow", 10.0 + TIME_WAIT)
    assert pool.take(10.0) is None and pool.take(10.0 + TIME_WAIT - 0.01) is None
    assert pool.take(10.0 + TIME_WAIT) == one
    assert len(pool.free) == 0


def test_a_pair_in_time_wait_is_taken_early_only_when_no_other_is_free():
    pool = PortPool(20000, 20002, [A])
    one, two = pool.take(0.0), pool.take(0.0)
    pool.leased[one] = pool.leased[two] = "flow"
    pool.release(two, "flow", 1.0 + TIME_WAIT)
    pool.release(one, "flow", 2.0 + TIME_WAIT)
    assert pool.take(5.0) not in (one, two, None)        # the unused pair first
    assert pool.take(5.0) is None
    assert pool.take_early() == two                      # then the one longest in TIME_WAIT
    assert pool.take_early() == one
    assert pool.take_early() is None                     # every pair held by a live flow


def test_only_the_holder_gives_a_pair_back():
    pool = PortPool(20000, 20000, [A])
    pair = pool.take(0.0)
    pool.leased[pair] = "new"
    assert not pool.release(pair, "old", 0.0)
    assert pool.take(0.0) is None


def test_a_resumed_pair_is_never_handed_out_twice():
    pool = PortPool(20000, 20003, [A], rng=random.Random(1))
    assert pool.lease((A, 20002)) and not pool.lease((A, 20002))
    assert not pool.lease((B, 20001)) and not pool.lease((A, 30000))
    pool.leased[(A, 20002)] = "resumed"
    taken = {pool.take(0.0) for _ in range(3)}
    assert pool.take(0.0) is None and (A, 20002) not in taken
    pool.release((A, 20002), "resumed", 0.0)
    assert pool.take(0.0) == (A, 20002) and pool.take(0.0) is None


def test_a_backend_on_our_own_address_never_sees_its_own_port_as_ours():
    pool = PortPool(8079, 8081, [A], exclude=(8080,))
    assert sorted(p for _, p in (pool.take(0.0), pool.take(0.0))) == [8079, 8081]
    assert pool.take(0.0) is None


# --- through the gateway pair ----------------------------------------------------------

def make_pair(port_range, sources=None, time_wait=TIME_WAIT):
    ctable = ServiceTable()
    ctable.add(ServicePrefix(SID, 224), Action.FORWARD, SGW)
    client = ClientTranslator(aton(CGW), lambda a, p: SID if (a, p) == (aton(VIP), 80) else None,
                              ctable, make_carriage("ip", "client"))
    stable = ServiceTable()
    stable.add(ServicePrefix(SID), Action.DEMUX, Backend(aton(SERVER), 8080, aton(SGW_LAN)))
    server = ServerTranslator(stable, make_carriage("ip", "server"), port_range=port_range,
                              sources=sources, backend_time_wait=time_wait)
    return client, server


def exchange(client, server, now):
    """Carry control packets both ways until neither side has more to say."""
    while client.outbox or server.outbox:
        c, s = client.outbox[:], server.outbox[:]
        client.outbox.clear()
        server.outbox.clear()
        for pkt in c:
            server.from_sal(pkt, now)
        for pkt in s:
            client.from_sal(pkt, now)


def connect(client, server, cport, now):
    """A handshake through the pair; (our address, our port) the backend sees, or None
    when the server gateway dropped the SYN."""
    sal_syn = client.from_legacy(tcp_packet(CLIENT, cport, VIP, 80, 1000, flags=SYN, mss=1460), now)
    to_backend = server.from_sal(sal_syn, now)
    if to_backend is None:
        return None
    src, lport = to_backend[12:16], TCP(to_backend[20:]).sport
    synack = tcp_packet(SERVER, 8080, _ntoa(src), lport, 5000, 1001, SYN | ACK, mss=1460)
    client.from_sal(server.from_backend(synack, now), now)
    server.from_sal(client.from_legacy(tcp_packet(CLIENT, cport, VIP, 80, 1001, 5001, ACK), now), now)
    return src, lport


def close(client, server, cport, ours, now, first):
    """The TCP close, ``first`` ("client" or "backend") sending its FIN first, and the
    SAL close after it."""
    src, lport = _ntoa(ours[0]), ours[1]

    def from_client(seq, ack, flags):
        out = client.from_legacy(tcp_packet(CLIENT, cport, VIP, 80, seq, ack, flags), now)
        if out is not None:
            server.from_sal(out, now)

    def from_backend(seq, ack, flags):
        out = server.from_backend(tcp_packet(SERVER, 8080, src, lport, seq, ack, flags), now)
        if out is not None:
            client.from_sal(out, now)

    if first == "client":
        from_client(1001, 5001, FIN | ACK)
        from_backend(5001, 1002, FIN | ACK)
        exchange(client, server, now)
        from_client(1002, 5002, ACK)
    else:
        from_backend(5001, 1001, FIN | ACK)
        from_client(1001, 5002, FIN | ACK)
        exchange(client, server, now)
        from_backend(5002, 1002, ACK)
    exchange(client, server, now)


def _ntoa(addr: bytes) -> str:
    return ".".join(map(str, addr))


def tick_timers(client, server, now):
    """Timers run; what they resend (the SYNs of refused connections) is lost here: each
    connection of these tests tries once."""
    server.handle_timer(now)
    client.handle_timer(now)
    client.outbox.clear()
    server.outbox.clear()


def run(client, server, per_second, seconds, first):
    """New connections at ``per_second`` for ``seconds``, each closed at once (the time
    it lives does not matter: what matters is when its pair comes back). Returns the
    pairs used and the number the server gateway refused."""
    used, refused, n = [], 0, 0
    for tick in range(int(per_second * seconds)):
        now = tick / per_second
        tick_timers(client, server, now)
        cport = 30000 + n % 30000
        n += 1
        ours = connect(client, server, cport, now)
        if ours is None:
            refused += 1
            continue
        used.append((now, ours))
        close(client, server, cport, ours, now, first)
    return used, refused


def test_sustained_connections_closed_by_our_side_reuse_pairs_at_once():
    """50 ports, 100 new connections a second for 5 s, each closed by the client first:
    the backend's socket is gone after LAST_ACK, so each pair is ready again at once
    (before: held until the flow left the table 5 s later, so 50 ports made 10/s)."""
    client, server = make_pair((20000, 20049))
    used, refused = run(client, server, 100, 5, "client")
    assert refused == 0 and server.stats["refused_ports_exhausted"] == 0
    assert len(used) == 500
    assert server.stats["ports_back_at_once"] == 500
    assert server.stats["ports_reused_early"] > 0      # lingering flows made room for new ones
    assert all(f.sal.state == State.CLOSED for f in server.flows.values())


def test_a_pair_whose_backend_closed_first_waits_while_others_are_free_then_oldest_first():
    """Closed by the backend first, a 4-tuple stays in the backend's TIME_WAIT: it is not
    used again while an unused pair is left; once none is, the pairs are taken early,
    the one closed longest ago first, so each waits as long as the load allows."""
    client, server = make_pair((20000, 20049))
    used, refused = run(client, server, 100, 2, "backend")
    assert refused == 0 and len(used) == 200
    assert len({p for _, p in used[:50]}) == 50                      # every pair once first
    assert server.stats["ports_reused_in_time_wait"] == 150
    assert [p for _, p in used[50:100]] == [p for _, p in used[:50]]  # then in the order they closed
    assert server.stats.get("refused_ports_exhausted", 0) == 0
    # after the TIME_WAIT, each pair serves again without being taken early
    tick_timers(client, server, 10.0)
    later, refused = run_from(client, server, 2 + TIME_WAIT + 1.0, 50, "backend")
    assert refused == 0 and {p for _, p in later} == {p for _, p in used}
    assert server.stats["ports_reused_in_time_wait"] == 150


def run_from(client, server, start, count, first):
    used, refused = [], 0
    for i in range(count):
        now = start + i * 0.01
        tick_timers(client, server, now)
        ours = connect(client, server, 50000 + i, now)
        if ours is None:
            refused += 1
            continue
        used.append((now, ours))
        close(client, server, 50000 + i, ours, now, first)
    return used, refused


def test_a_reset_frees_the_pair_at_once():
    client, server = make_pair((20000, 20000))
    src, lport = connect(client, server, 40000, 0.0)
    server.from_backend(tcp_packet(SERVER, 8080, _ntoa(src), lport, 5001, 0, RST), 0.0)
    assert server.stats["ports_back_at_once"] == 1
    assert connect(client, server, 40001, 0.1) == (src, lport)


def test_several_source_addresses_multiply_the_pairs():
    """Two of our addresses facing the backend: twice the connections in TIME_WAIT at
    once, and the backend's replies are told apart by our address too."""
    client, server = make_pair((20000, 20009), sources=[A, B])
    used, refused = run(client, server, 100, 0.2, "backend")
    assert refused == 0 and server.stats["ports_reused_in_time_wait"] == 0
    assert {p[0] for _, p in used} == {A, B}
    assert len({p for _, p in used}) == 20
    # the same port on both addresses at once, each its own connection
    client2, server2 = make_pair((20000, 20000), sources=[A, B])
    one, two = connect(client2, server2, 40000, 0.0), connect(client2, server2, 40001, 0.0)
    assert {one, two} == {(A, 20000), (B, 20000)}
    data = tcp_packet(SERVER, 8080, _ntoa(two[0]), 20000, 5001, 1001, ACK, b"for the second")
    out = client2.from_sal(server2.from_backend(data, 0.1), 0.1)
    assert TCP(out[20:]).dport == 40001


def test_a_late_packet_of_a_flow_whose_pair_was_reused_is_not_translated():
    """The old flow lingered on a pair that a new connection took: it is forgotten, so a
    late segment of the old connection cannot reach the backend on the new one's 4-tuple."""
    client, server = make_pair((20000, 20000))
    first = connect(client, server, 40000, 0.0)
    close(client, server, 40000, first, 0.0, "client")
    (old,) = server.flows.values()
    assert connect(client, server, 40001, 0.5) == first
    assert old.sal.local_flow not in server.flows
    late = client.from_legacy(tcp_packet(CLIENT, 40000, VIP, 80, 1002, 5002, ACK), 0.6)
    assert late is None or server.from_sal(late, 0.6) is None


# --- configuration ---------------------------------------------------------------------

SERVER_TOML = """
[gateway]
{extra}

[[service]]
name = "web.svc.example"
port = 80
backend = "198.19.3.2:8080"
"""


def load_server(tmp_path, extra: str):
    from gateway.config import load
    path = tmp_path / "server.toml"
    path.write_text(SERVER_TOML.format(extra=extra))
    return load(str(path), "server")


def test_the_default_range_is_every_unprivileged_port_below_the_ephemeral_range(tmp_path):
    cfg = load_server(tmp_path, "")
    assert cfg.port_range == (1024, 32767) and cfg.source_addresses == [] and cfg.backend_time_wait == 60.0


def test_source_addresses_and_time_wait_reach_the_translator(tmp_path):
    from gateway.daemon import build_translator
    cfg = load_server(tmp_path, 'source_addresses = ["198.19.3.1", "198.19.3.5"]\nbackend_time_wait = 120')
    server = build_translator(cfg, lambda host: ("198.19.3.1", "lan0"), {"lan0": 1500})
    assert server.sources == [A, B] and server.backend_time_wait == 120.0
    client, _ = make_pair((20000, 20009))
    server.outbox.clear()
    sal_syn = client.from_legacy(tcp_packet(CLIENT, 40000, VIP, 80, 1000, flags=SYN, mss=1460), 0.0)
    assert server.from_sal(sal_syn, 0.0)[12:16] in (A, B)


@pytest.mark.parametrize("extra, line, words", [
    ('source_addresses = ["198.19.3.1", "nonsense"]', 3, "not an IPv4 address"),
    ('source_addresses = "198.19.3.1"', 3, "a list of our IPv4 addresses"),
    ('source_addresses = ["198.19.3.1", "198.19.3.1"]', 3, "listed twice"),
    ("backend_time_wait = -1", 3, "TIME_WAIT in seconds"),
    ('accept_broadcast_syn = "yes"', 3, "true or false"),
])
def test_bad_server_keys_are_refused_with_their_line(tmp_path, extra, line, words):
    from gateway.config import ConfigError
    with pytest.raises(ConfigError) as exc:
        load_server(tmp_path, extra)
    assert f"server.toml:{line}:" in str(exc.value) and words in str(exc.value)


def test_a_syn_refused_for_want_of_ports_is_told_to_the_legacy_client_at_once():
    """The pool is empty (its one pair held by a live flow): the server gateway
    answers the SAL SYN with a RST, and the client gateway resets the legacy client's
    connect at once (before: the SYN was dropped, and the client waited out its
    retransmissions)."""
    client, server = make_pair((20000, 20000))
    first = connect(client, server, 40000, 0.0)               # open: its pair is held
    sal_syn = client.from_legacy(tcp_packet(CLIENT, 40001, VIP, 80, 7000, flags=SYN, mss=1460), 0.5)
    assert server.from_sal(sal_syn, 0.5) is None
    assert server.stats["refused_ports_exhausted"] == 1
    (sal_rst,) = server.outbox
    server.outbox.clear()
    client.from_sal(sal_rst, 0.5)
    (legacy_rst,) = client.outbox
    seg = TCP(legacy_rst[20:])
    assert (seg.sport, seg.dport) == (80, 40001)
    assert seg.flags & RST and seg.flags & ACK and seg.ack == 7001    # SYN-SENT takes it: "refused"


def test_a_pair_taken_early_clears_the_backend_s_time_wait_and_the_handshake_completes():
    """One pair, in the backend's TIME_WAIT (it closed first) after its flow was
    forgotten: a new connection takes it early. The backend answers the SYN with an ACK
    of its old connection (no newer timestamp); the server gateway sends a RST at that
    ACK's number, which ends the TIME_WAIT, and the SYN again at once."""
    client, server = make_pair((20000, 20000))
    first = connect(client, server, 40000, 0.0)
    close(client, server, 40000, first, 0.0, "backend")
    tick_timers(client, server, 10.0)                    # forgotten; the pair cools until 60 s
    assert sum(p.cooling(10.0) for p in server.pools.values()) == 1
    sal_syn = client.from_legacy(tcp_packet(CLIENT, 40001, VIP, 80, 7000, flags=SYN, mss=1460), 10.0)
    syn = server.from_sal(sal_syn, 10.0)
    assert syn is not None and server.stats["ports_reused_in_time_wait"] == 1
    src, lport = _ntoa(syn[12:16]), TCP(syn[20:]).sport
    assert (syn[12:16], lport) == first
    challenge = tcp_packet(SERVER, 8080, src, lport, 5002, 1002, ACK)     # the old connection's numbers
    assert server.from_backend(challenge, 10.0) is None                    # not for the client
    rst, again = server.outbox
    server.outbox.clear()
    r = TCP(rst[20:])
    assert (rst[12:16], rst[16:20], r.sport, r.dport) == (syn[12:16], syn[16:20], lport, 8080)
    assert r.flags == RST and r.seq == 1002
    assert again == syn and server.stats["backend_time_wait_reset"] == 1
    synack = tcp_packet(SERVER, 8080, src, lport, 9000, 7001, SYN | ACK, mss=1460)
    client.from_sal(server.from_backend(synack, 10.0), 10.0)
    server.from_sal(client.from_legacy(tcp_packet(CLIENT, 40001, VIP, 80, 7001, 9001, ACK), 10.0), 10.0)
    (flow,) = server.flows.values()
    assert flow.sal.state == State.ESTABLISHED and not server._syns_sent
