"""UDP flows in restart snapshots (gateway/translate/snapshot.py): a restarted gateway
takes its UDP flows back, and the next datagram either way goes on on the same SAL flow."""
import json

import pytest

from gateway.translate import snapshot
from sal import wire
from sal.ip import ntoa
from tests.unit.test_udp_flows import (CGW, CLIENT, SERVER, SGW_LAN, VIP, check_sal, check_udp,
                                       make_pair, open_flow, take, udp_packet)


def saved(translator, now):
    return json.loads(json.dumps(snapshot.dump(translator, now)))     # as written to disk


def flow_ids(translator):
    (flow,) = translator.flows.values()
    return flow.sal.local_flow, flow.sal.remote_flow


def exchange(client, server, bport, now, i):
    """A query and its answer through the pair; both SAL packets checked to be data of
    the one flow (no SYN, no control)."""
    query = client.from_legacy_udp(udp_packet(CLIENT, 5353, VIP, 53, b"q%d" % i), now)
    assert query is not None and not take(client), "the query goes out at once, on the flow"
    _, hdr, _ = check_sal(query)
    assert hdr.control is None and hdr.extensions == []
    assert check_udp(server.from_sal(query, now), SGW_LAN, SERVER) == (bport, 5300, b"q%d" % i)
    answer = server.from_backend_udp(udp_packet(SERVER, 5300, SGW_LAN, bport, b"a%d" % i), now)
    ip, back, _ = check_sal(answer)
    assert back.control is None and ntoa(ip.dst) == CGW
    assert check_udp(client.from_sal(answer, now), VIP, CLIENT) == (53, 5353, b"a%d" % i)
    return (hdr.src_flow, hdr.dst_flow), (back.src_flow, back.dst_flow)


@pytest.mark.parametrize("carriage", ["ip", "udp"])
@pytest.mark.parametrize("restarted", ["client", "server", "both"])
def test_udp_flow_goes_on_after_a_restart(carriage, restarted):
    client, server = make_pair(carriage=carriage)
    bport = open_flow(client, server)
    before = flow_ids(client), flow_ids(server)
    cdata, sdata = saved(client, 5.0), saved(server, 5.0)
    assert len(cdata["udp_flows"]) == 1 and len(sdata["udp_flows"]) == 1
    assert cdata["flows"] == [] and sdata["flows"] == []          # (no TCP row for a UDP flow)
    fresh_client, fresh_server = make_pair(carriage=carriage)
    if restarted in ("client", "both"):
        assert snapshot.restore(fresh_client, cdata, 6.0) == 1
        client = fresh_client
        assert client.stats["flows_resumed"] == 1
    if restarted in ("server", "both"):
        assert snapshot.restore(fresh_server, sdata, 6.0) == 1
        server = fresh_server
        assert server.stats["flows_resumed"] == 1
    assert (flow_ids(client), flow_ids(server)) == before
    out, back = exchange(client, server, bport, 6.1, 1)
    assert out == (before[0][0], before[0][1]) and back == (before[1][0], before[1][1])
    assert client.stats["udp_flows_opened"] + server.stats["udp_flows_opened"] == \
        {"client": 1, "server": 1, "both": 0}[restarted]          # only the never-restarted side's first one
    exchange(client, server, bport, 7.0, 2)


def test_restored_server_flow_holds_its_port_toward_the_backend():
    client, server = make_pair()
    bport = open_flow(client, server)
    server2 = make_pair()[1]
    assert snapshot.restore(server2, saved(server, 5.0), 6.0) == 1
    # a second client 5-tuple opens a new flow: it gets another port toward the backend
    other = open_flow(client, server2, now=6.5, sport=6000)
    assert other != bport and len(server2.flows) == 2


def test_restored_udp_flow_still_ends_when_idle():
    client, server = make_pair()
    open_flow(client, server)
    client2 = make_pair()[0]
    snapshot.restore(client2, saved(client, 5.0), 6.0)
    client2.handle_timer(6.0 + 29.0)
    assert not take(client2)
    client2.handle_timer(6.0 + 30.1)                    # udp_idle (30 s) after the restart
    (fin,) = take(client2)
    assert check_sal(fin)[1].flags == wire.FIN


def test_closing_and_half_open_udp_flows_are_not_saved():
    client, server = make_pair()
    open_flow(client, server)
    client.handle_timer(40.0)                           # idle: our FIN is out, the flow closing
    assert saved(client, 41.0)["udp_flows"] == []
    client.from_legacy_udp(udp_packet(CLIENT, 7000, VIP, 53, b"q"), 50.0)   # SYN sent, unanswered
    assert saved(client, 51.0)["udp_flows"] == []


def test_udp_flows_of_another_carriage_or_role_are_not_resumed():
    client, server = make_pair(carriage="ip")
    open_flow(client, server)
    data = saved(client, 5.0)
    udp_client = make_pair(carriage="udp")[0]
    assert snapshot.restore(udp_client, data, 6.0) == 0 and not udp_client.flows
    assert snapshot.restore(make_pair()[1], data, 6.0) == 0


def test_a_snapshot_without_udp_flows_still_reads():
    """An earlier version's snapshot: TCP rows only, no ``udp_flows`` key."""
    from tests.unit.test_translate import handshake, make_pair as tcp_pair
    client, server = tcp_pair()
    handshake(client, server)
    data = saved(client, 5.0)
    del data["udp_flows"]
    assert snapshot.restore(tcp_pair()[0], data, 6.0) == 1


def test_a_udp_row_for_a_4_tuple_already_held_is_skipped():
    client, server = make_pair()
    open_flow(client, server)
    data = saved(client, 5.0)
    assert snapshot.restore(client, data, 6.0) == 0          # same flowID: skipped
    data["udp_flows"][0]["local_flow"] += 1                  # another flowID, same 4-tuple
    assert snapshot.restore(client, data, 6.0) == 0 and len(client.flows) == 1
