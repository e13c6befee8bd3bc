"""The registration control plane: codec (golden bytes), authentication and replay
checks, the server gateway's Registrar, health checks, and the client's router health."""
import hashlib
import hmac
from collections import Counter

import pytest

from gateway.health import HealthCheck
from gateway.registration import Registrar
from gateway.router_health import RouterHealth
from gateway.table_owner import Rule, TableOwner
from sal import registration as reg
from sal.ip import aton
from sal.serviceid import ServicePrefix, service_id_for
from sal.service_table import Action, ServiceTable

SECRET = bytes(range(32))
KEY = reg.Key("deployment", SECRET)
SID = service_id_for("web.svc.example", 80)
RECORD = reg.Record("web.svc.example", ServicePrefix(SID), 3, 1)
NOW_NS = 1_800_000_000 * 10**9
ROUTERS = [("198.19.20.1", 54326), ("198.19.21.1", 54326)]


def test_register_golden_bytes():
    msg = reg.Message(reg.REGISTER, 0x0102030405060708, "k1", "sgw0", address=aton("198.19.30.1"),
                      hold_ms=300, records=[RECORD])
    body = (b"SR\x01\x01" + bytes.fromhex("0102030405060708") + b"\x02k1" + b"\x04sgw0"
            + bytes((198, 19, 30, 1)) + (300).to_bytes(4, "big") + b"\x01"
            + (256).to_bytes(2, "big") + SID + (3).to_bytes(2, "big") + (1).to_bytes(2, "big")
            + b"\x0fweb.svc.example")
    assert reg.encode(msg, SECRET) == body + hmac.new(SECRET, body, hashlib.sha256).digest()


@pytest.mark.parametrize("msg", [
    reg.Message(reg.REGISTER, 5, "deployment", "sgw0", aton("198.19.30.1"), 200, [RECORD, reg.Record(
        "other", ServicePrefix(service_id_for("other"), 224), 1, 7)]),
    reg.Message(reg.UNREGISTER, 6, "deployment", "sgw0", aton("198.19.30.1"), records=[]),
    reg.Message(reg.ACK, 7, "deployment", "r0", acked_seq=6, status=1),
    reg.Message(reg.PROBE, 8, "deployment", "cgw"),
    reg.Message(reg.PROBE_ACK, 9, "deployment", "r0", acked_seq=8, status=1),
])
def test_round_trip(msg):
    assert reg.decode(reg.encode(msg, SECRET), SECRET) == msg


def test_forged_and_damaged_messages_are_refused():
    data = reg.encode(reg.Message(reg.PROBE, 1, "deployment", "x"), SECRET)
    with pytest.raises(reg.Refused, match="bad_mac"):
        reg.decode(data, b"\x01" * 32)
    flipped = bytearray(data)
    flipped[10] ^= 1
    with pytest.raises(reg.Refused, match="bad_mac"):
        reg.decode(bytes(flipped), SECRET)
    for bad in (b"", b"XX" + data[2:], data[:20]):
        with pytest.raises(reg.Refused):
            reg.decode(bad, SECRET)


def test_verifier_refuses_unknown_key_replay_and_stale():
    stats = Counter()
    v = reg.Verifier([KEY], stats, window_ns=10**9)
    signer = reg.Signer(KEY, "sgw0")
    first, _ = signer.message(reg.PROBE, NOW_NS)
    second, _ = signer.message(reg.PROBE, NOW_NS)        # same clock: seq still goes up
    assert v.check(first, NOW_NS)[0].sender == "sgw0"
    assert v.check(second, NOW_NS)[0].seq > reg.decode(first, SECRET).seq
    for data, reason in ((first, "replay"), (second, "replay")):
        with pytest.raises(reg.Refused, match=reason):
            v.check(data, NOW_NS)
    old, _ = reg.Signer(KEY, "sgw1").message(reg.PROBE, NOW_NS - 2 * 10**9)
    with pytest.raises(reg.Refused, match="stale"):
        v.check(old, NOW_NS)
    other, _ = reg.Signer(reg.Key("team-b", SECRET), "sgw2").message(reg.PROBE, NOW_NS)
    with pytest.raises(reg.Refused, match="unknown_key"):
        v.check(other, NOW_NS)
    assert stats == Counter({"refused_replay": 2, "refused_stale": 1, "refused_unknown_key": 1})


def test_seq_clock_never_goes_back():
    clock = reg.SeqClock()
    a = clock.next(1000)
    assert clock.next(10) == a + 1 and clock.next(5000) == 5000


def test_owner_keys_cover_only_their_names():
    team = reg.Key("team-a", SECRET, ("web.*",))
    assert reg.owns(team, RECORD)
    assert reg.owns(team, reg.Record("web.svc.example", ServicePrefix(service_id_for("web.svc.example"), 224)))
    assert not reg.owns(team, reg.Record("db.svc.example", ServicePrefix(service_id_for("db.svc.example", 5432))))
    # a name it owns, with another name's serviceID, or a prefix wider than its name
    assert not reg.owns(team, reg.Record("web.a", ServicePrefix(service_id_for("db.svc.example", 80))))
    assert not reg.owns(team, reg.Record("web.a", ServicePrefix(service_id_for("web.a"), 200)))
    assert reg.owns(KEY, reg.Record("anything", ServicePrefix(bytes(32), 0)))


def test_parse_key():
    assert reg.parse_key("00" * 16 + "\n") == bytes(16)
    for bad in ("zz" * 16, "00" * 8):
        with pytest.raises(ValueError):
            reg.parse_key(bad)


# --- the server gateway's registrar ---------------------------------------------------

def make_registrar():
    r = Registrar(reg.Signer(KEY, "sgw0"), aton("198.19.30.1"), ROUTERS, refresh=0.1, hold=0.3)
    r.offer("web.svc.example:80", RECORD)
    return r


def sent(datagrams):
    assert [router for _, router in datagrams] == ROUTERS, "every router gets every message"
    assert len({data for data, _ in datagrams}) == 1
    return reg.decode(datagrams[0][0], SECRET)


def test_registrar_registers_only_healthy_services_and_refreshes():
    r = make_registrar()
    msg = sent(r.tick(0.0, NOW_NS))
    assert msg.type == reg.REGISTER and msg.records == [] and msg.hold_ms == 300   # not checked yet
    assert r.tick(0.05, NOW_NS) == []
    msg = sent(r.set_health("web.svc.example:80", True, 0.06, NOW_NS))             # at once
    assert msg.type == reg.REGISTER and msg.records == [RECORD]
    assert r.tick(0.1, NOW_NS) == [] and sent(r.tick(0.17, NOW_NS)).records == [RECORD]
    assert r.set_health("web.svc.example:80", True, 0.18, NOW_NS) == []               # no change


def test_registrar_withdraws_on_health_down_and_drain_and_stop():
    r = make_registrar()
    r.set_health("web.svc.example:80", True, 0.0, NOW_NS)
    msg = sent(r.set_health("web.svc.example:80", False, 0.01, NOW_NS))
    assert msg.type == reg.UNREGISTER and msg.records == [RECORD]
    assert sent(r.tick(0.2, NOW_NS)).records == []                 # the refresh agrees
    r.set_health("web.svc.example:80", True, 0.3, NOW_NS)
    msg = sent(r.set_drained("web.svc.example:80", True, 0.31, NOW_NS))
    assert msg.type == reg.UNREGISTER and r.offers["web.svc.example:80"].state == "draining"
    assert sent(r.set_drained("web.svc.example:80", False, 0.32, NOW_NS)).records == [RECORD]
    msg = sent(r.stop(0.4, NOW_NS))
    assert msg.type == reg.UNREGISTER and msg.records == []        # all


def test_registrar_re_registers_from_a_new_address():
    r = make_registrar()
    r.set_health("web.svc.example:80", True, 0.0, NOW_NS)
    assert r.set_address(aton("198.19.30.1"), 0.01, NOW_NS) == []
    msg = sent(r.set_address(aton("198.19.35.1"), 0.02, NOW_NS))
    assert msg.type == reg.REGISTER and msg.address == aton("198.19.35.1") and msg.records == [RECORD]


def test_registrar_takes_only_acks_of_what_it_sent():
    r = make_registrar()
    data, _ = r.set_health("web.svc.example:80", True, 0.0, NOW_NS)[0]
    seq = reg.decode(data, SECRET).seq
    router_signer = reg.Signer(KEY, "r0")
    ack, _ = router_signer.message(reg.ACK, NOW_NS, acked_seq=seq, status=0)
    assert r.on_reply(ack, ROUTERS[0], 0.002) == pytest.approx(0.002)
    assert r.routers_acked(0.01) == 1
    unknown, _ = router_signer.message(reg.ACK, NOW_NS, acked_seq=seq + 999)
    forged = reg.encode(reg.Message(reg.ACK, 1, "deployment", "r0", acked_seq=seq), b"\x02" * 32)
    assert r.on_reply(unknown, ROUTERS[1], 0.01) is None and r.on_reply(forged, ROUTERS[1], 0.01) is None
    assert r.routers_acked(0.01) == 1 and r.routers_acked(1.0) == 0     # older than the hold time


# --- health checks --------------------------------------------------------------------

def test_health_first_result_decides_then_thresholds():
    h = HealthCheck(interval=0.1, rise=2, fall=3)
    assert h.due(0.0)
    h.started(0.0)
    assert not h.due(0.05) and h.state == "unknown"
    assert h.result(True) is True and h.state == "up"
    assert [h.result(False) for _ in range(3)] == [None, None, False]
    assert h.result(True) is None and h.result(False) is None      # a success resets nothing yet
    assert h.result(True) is None and h.result(True) is True
    assert h.result(False, "refused") is None and h.result(True) is None and h.result(False, "timeout") is None
    assert h.up and h.last_error == "timeout" and h.failures == 6


def test_health_hurry_makes_a_check_due():
    h = HealthCheck(interval=1.0)
    h.started(0.0)
    h.result(True)
    assert not h.due(0.1)
    h.hurry(0.1)
    assert h.due(0.1)


# --- the client's routers -------------------------------------------------------------

def probe_ack(data, ready=1, key=SECRET):
    msg = reg.decode(data, SECRET)
    return reg.encode(reg.Message(reg.PROBE_ACK, msg.seq + 1, "deployment", "r", acked_seq=msg.seq,
                                  status=ready), key)


def test_router_health_live_warming_dead():
    h = RouterHealth(reg.Signer(KEY, "cgw"), ROUTERS, interval=0.1, misses=3, now=0.0)
    assert h.live(0.0) == ["198.19.20.1", "198.19.21.1"]          # benefit of the doubt at start
    probes = h.tick(0.0, NOW_NS)
    assert [r for _, r in probes] == ROUTERS and h.tick(0.05, NOW_NS) == []
    assert h.on_reply(probe_ack(probes[0][0]), ROUTERS[0], 0.001)
    assert not h.on_reply(probe_ack(probes[0][0]), ROUTERS[0], 0.002)        # replayed answer
    assert not h.on_reply(probe_ack(probes[1][0], key=b"\x03" * 32), ROUTERS[1], 0.002)   # forged
    assert h.on_reply(probe_ack(probes[1][0], ready=0), ROUTERS[1], 0.002)   # warming up
    assert h.live(0.01) == ["198.19.20.1"]
    assert h.live(0.29) == ["198.19.20.1"] and h.live(0.31) == []           # three probes unanswered
    rows = h.rows(0.01)
    assert [r["state"] for r in rows] == ["live", "warming"]


def test_default_rule_follows_live_routers_and_falls_back_to_all():
    table = ServiceTable()
    prefix = ServicePrefix(bytes(32), 0)
    owner = TableOwner(table, [Rule(prefix, Action.FORWARD, a, router=True) for a, _ in ROUTERS])
    assert owner.set_live_routers(["198.19.21.1"]) == (["198.19.20.1"], [])
    assert {table.resolve(SID).target for _ in range(20)} == {"198.19.21.1"}
    assert owner.set_live_routers([]) == ([], ["198.19.20.1"])        # none live: all
    assert owner.set_live_routers(["198.19.20.1", "198.19.21.1"]) == ([], [])
    assert {t.target for e in table.entries() for t in e.targets} == {"198.19.20.1", "198.19.21.1"}


# --- [routing] in a gateway config, and SYNs waiting on a router that died ------------

def test_routing_section_gives_a_client_its_default_rule():
    from gateway.config import ConfigError, parse
    base = {"gateway": {"sal_address": "198.19.10.1"},
            "service": [{"name": "web.svc.example", "address": "198.18.0.10", "port": 80}],
            "routing": {"routers": ["198.19.20.1", "198.19.21.1:6000"], "key": "ab" * 32,
                        "refresh_interval": 0.05, "health": {"interval": 0.1, "fall": 3}}}
    cfg = parse(base, "client.toml", "client")           # no [[route]] needed
    assert cfg.routing.routers == [("198.19.20.1", 54326), ("198.19.21.1", 6000)]
    assert cfg.routing.hold_time == pytest.approx(0.15) and cfg.routing.health.fall == 3
    assert [(r.prefix.bits, r.next_hop) for r in cfg.rules] == [(0, "198.19.20.1"), (0, "198.19.21.1")]
    assert cfg.routing.sender == "client" and cfg.routing.key.secret == b"\xab" * 32
    for broken in ({"routers": []}, {"hold_time": 0.01}, {"health": {"rise": 0}}, {"bogus": 1},
                   {"key": "00"}, {"routers": ["nohost"]}):
        data = {**base, "routing": {**base["routing"], **broken}}
        with pytest.raises(ConfigError, match="routing"):
            parse(data, "client.toml", "client")


@pytest.mark.parametrize("carriage", ["ip", "udp"])
def test_redirect_pending_sends_a_waiting_syn_to_a_live_router(carriage):
    from sal.ip import aton
    from gateway.translate import ClientTranslator
    from gateway.translate.carriage import make_carriage
    from sal import wire
    from sal.ip import IPv4, ntoa, transport_checksum_ok
    from tests.unit.packets import SYN, tcp_packet

    table = ServiceTable()
    prefix = ServicePrefix(bytes(32), 0)
    table.add(prefix, Action.FORWARD, "198.19.20.1")
    client = ClientTranslator(aton("198.19.10.1"), lambda a, p: SID, table, make_carriage(carriage, "client"))
    client.from_legacy(tcp_packet("198.19.1.2", 40000, "198.18.0.10", 80, 1, flags=SYN, mss=1400), 0.0)
    table.remove(prefix, "198.19.20.1")
    table.add(prefix, Action.FORWARD, "198.19.21.1")
    assert client.redirect_pending({aton("198.19.20.1")}, 0.1) == 1
    (pkt,) = client.outbox
    ip = IPv4(pkt)
    assert ntoa(ip.dst) == "198.19.21.1"
    body = pkt[20:] if carriage == "ip" else pkt[28:]
    hdr, off = wire.decode(body)
    pseudo = (ip.src, ip.dst) if carriage == "ip" else (bytes(4), bytes(4))
    assert hdr.flags == wire.SYN and transport_checksum_ok(*pseudo, 6, body[off:])
    assert client.redirect_pending({aton("198.19.20.1")}, 0.2) == 0     # nothing left to move
