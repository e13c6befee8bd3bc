"""The service router's core with a fake clock: registrations, the SYN rewrite (every
checksum verified), weighted choice, expiry, DROP/DELAY, affinity, refusals; and a
connection set up through a router in memory (client translator -> router -> server
translator -> SYN-ACK straight back to the client)."""
import random
import struct

import pytest

from gateway.translate import Backend, ClientTranslator, ServerTranslator
from gateway.translate.carriage import make_carriage
from router.config import RouterConfigError, parse as parse_config
from router.core import PASS, RouterCore, RouterOptions
from sal import registration as reg
from sal import wire
from sal.checksum import checksum
from sal.ip import IPv4, aton, ntoa, transport_checksum, transport_checksum_ok
from sal.serviceid import ServicePrefix, service_id_for
from sal.service_table import Action, ServiceTable
from tests.unit.packets import ACK, SYN, tcp_packet

SECRET = bytes(range(32))
KEY = reg.Key("deployment", SECRET)
SID = service_id_for("web.svc.example", 80)
ROUTER, CGW, SGW0, SGW1 = "198.19.20.1", "198.19.10.1", "198.19.30.1", "198.19.31.1"
WALL = 1_800_000_000 * 10**9


def record(weight=1, priority=1, sid=SID, name="web.svc.example"):
    return reg.Record(name, ServicePrefix(sid), weight, priority)


class Sender:
    """A server gateway's side of the control plane, with its own seq clock."""

    def __init__(self, name, address, key=KEY):
        self.signer = reg.Signer(key, name)
        self.address = aton(address)

    def register(self, *records, hold_ms=300):
        return self.signer.message(reg.REGISTER, WALL, address=self.address, hold_ms=hold_ms, records=list(records))[0]

    def unregister(self, *records):
        return self.signer.message(reg.UNREGISTER, WALL, address=self.address, records=list(records))[0]


def make_router(seed=1, **options):
    return RouterCore("r0", [KEY], RouterOptions(address=aton(ROUTER), **options), now=0.0, rng=random.Random(seed))


def sal_syn(flow=0x1234, carriage="ip", sid=SID, src=CGW, extra=()):
    """A client gateway's SAL SYN to the router (TCP checksum over the real pseudo-header)."""
    seg = bytearray(tcp_packet("198.19.1.2", 40000, "198.18.0.10", 80, 1000, flags=SYN, mss=1400)[20:])
    seg[0:4] = bytes(4)
    pseudo = (aton(src), aton(ROUTER)) if carriage == "ip" else (bytes(4), bytes(4))
    seg[16:18] = transport_checksum(*pseudo, 6, bytes(seg), 16).to_bytes(2, "big")
    hdr = wire.SalHeader(flow, 0, 6, [wire.Control(wire.SYN, 7, 0, b"n" * 8), wire.Service(sid), *extra])
    body = hdr.encode() + bytes(seg)
    return make_carriage(carriage, "client").wrap(aton(src), aton(ROUTER), body, 54325) if carriage == "udp" \
        else make_carriage("ip", "client").wrap(aton(src), aton(ROUTER), body, 0)


def check_forwarded(pkt, carriage="ip"):
    ip = IPv4(pkt)
    assert len(pkt) == ip.total_length and checksum(pkt[:20]) == 0, "IP header checksum"
    at = 20 if carriage == "ip" else 28
    if carriage == "udp":
        assert int.from_bytes(pkt[24:26], "big") == len(pkt) - 20
    hdr, off = wire.decode(pkt[at:])
    assert hdr.checksum_ok
    pseudo = (ip.src, ip.dst) if carriage == "ip" else (bytes(4), bytes(4))
    assert transport_checksum_ok(*pseudo, 6, pkt[at + off:]), "TCP checksum after the new destination"
    return ip, hdr


@pytest.mark.parametrize("carriage", ["ip", "udp"])
def test_syn_is_rewritten_to_the_instance_with_source(carriage):
    r = make_router()
    assert r.on_control(Sender("sgw0", SGW0).register(record()), 0.0, WALL) is not None
    out = r.on_packet(sal_syn(carriage=carriage), 0.0)
    ip, hdr = check_forwarded(out, carriage)
    assert ntoa(ip.src) == CGW and ntoa(ip.dst) == SGW0             # the source is kept
    assert hdr.source.addresses == [aton(CGW)] and hdr.service.service_id == SID
    assert hdr.control.flags == wire.SYN and hdr.src_flow == 0x1234
    assert len(out) == len(sal_syn(carriage=carriage)) + 8
    assert r.stats["syn_forwarded"] == 1 and r.service_stats[ServicePrefix(SID)]["forwarded"] == 1


def test_an_existing_source_gets_our_address_as_a_hop():
    r = make_router()
    r.on_control(Sender("sgw0", SGW0).register(record()), 0.0, WALL)
    out = r.on_packet(sal_syn(extra=[wire.Source([aton("198.19.99.9")])]), 0.0)
    _, hdr = check_forwarded(out)
    assert hdr.source.addresses == [aton("198.19.99.9"), aton(ROUTER)]


@pytest.mark.parametrize("carriage", ["ip", "udp"])
def test_connection_through_the_router_binds_late_to_the_instance(carriage):
    ctable = ServiceTable()
    ctable.add(ServicePrefix(bytes(32), 0), Action.FORWARD, ROUTER)
    client = ClientTranslator(aton(CGW), lambda a, p: SID, ctable, make_carriage(carriage, "client"))
    stable = ServiceTable()
    stable.add(ServicePrefix(SID), Action.DEMUX, Backend(aton("198.19.40.2"), 8080, aton("198.19.40.1")))
    server = ServerTranslator(stable, make_carriage(carriage, "server"))
    r = make_router()
    r.on_control(Sender("sgw0", SGW0).register(record()), 0.0, WALL)
    syn = client.from_legacy(tcp_packet("198.19.1.2", 40000, "198.18.0.10", 80, 1000, flags=SYN, mss=1460), 0.0)
    assert ntoa(IPv4(syn).dst) == ROUTER
    to_backend = server.from_sal(r.on_packet(syn, 0.0), 0.0)
    ours, _, isn = struct.unpack_from("!HHI", to_backend, 20)
    synack = tcp_packet("198.19.40.2", 8080, "198.19.40.1", ours, 5000, isn + 1, flags=SYN | ACK, mss=1460)
    sal_synack = server.from_backend(synack, 0.0)
    ip = IPv4(sal_synack)
    assert (ntoa(ip.src), ntoa(ip.dst)) == (SGW0, CGW)         # straight back, not via the router
    legacy = client.from_sal(sal_synack, 0.0)
    assert IPv4(legacy).dst == aton("198.19.1.2")
    (flow,) = client.flows.values()
    assert ntoa(flow.peer_addr) == SGW0 and client.stats["flows_established"] == 1
    ack = client.from_legacy(tcp_packet("198.19.1.2", 40000, "198.18.0.10", 80, 1001, 5001, flags=ACK), 0.0)
    assert ntoa(IPv4(ack).dst) == SGW0                          # data never goes to the router


def test_weighted_choice_and_priority():
    r = make_router(seed=7)
    r.on_control(Sender("sgw0", SGW0).register(record(weight=1)), 0.0, WALL)
    r.on_control(Sender("sgw1", SGW1).register(record(weight=3)), 0.0, WALL)
    n = 4000
    dst = [ntoa(IPv4(r.on_packet(sal_syn(flow=i + 1), 0.0)).dst) for i in range(n)]
    # binomial(4000, 1/4): mean 1000, sd 27.4; 5 sd either side
    assert abs(dst.count(SGW0) - 1000) < 137, dst.count(SGW0)
    r.on_control(Sender("backup", "198.19.32.1").register(record(priority=0)), 0.0, WALL)
    r.on_control(Sender("sgw2", "198.19.33.1").register(record(weight=1, priority=5)), 0.0, WALL)
    assert {ntoa(IPv4(r.on_packet(sal_syn(flow=10**6 + i), 0.0)).dst) for i in range(50)} == {"198.19.33.1"}


def test_refresh_expiry_unregister_and_moving():
    r = make_router()
    s = Sender("sgw0", SGW0)
    r.on_control(s.register(record(), hold_ms=300), 0.0, WALL)
    r.on_control(s.register(record(), hold_ms=300), 0.2, WALL)      # refresh: expires at 0.5
    r.handle_timer(0.45)
    assert r.on_packet(sal_syn(flow=1), 0.45) is not None
    assert r.next_deadline() == pytest.approx(0.5)
    r.handle_timer(0.5)
    assert r.on_packet(sal_syn(flow=2), 0.5) is None and r.stats["dropped_no_service"] == 1
    assert r.registry.stats["registrations_expired"] == 1
    # re-register from a new address: the old one is gone
    r.on_control(s.register(record()), 1.0, WALL)
    s.address = aton("198.19.35.1")
    r.on_control(s.register(record()), 1.1, WALL)
    assert {ntoa(IPv4(r.on_packet(sal_syn(flow=3 + i), 1.1)).dst) for i in range(20)} == {"198.19.35.1"}
    assert r.registry.stats["registrations_moved"] == 1
    # a REGISTER without the service withdraws it; so does UNREGISTER
    other = record(sid=service_id_for("web.svc.example", 81))
    r.on_control(s.register(record(), other), 1.2, WALL)
    r.on_control(s.register(other), 1.3, WALL)
    assert r.on_packet(sal_syn(flow=50), 1.3) is None
    r.on_control(s.unregister(), 1.4, WALL)
    assert r.registry.by_sender == {} and r.services(1.4) == []
    r.on_control(s.register(), 1.5, WALL)              # nothing on offer: nothing held
    assert r.registry.by_sender == {}


def test_forged_replayed_and_foreign_registrations_change_nothing():
    r = make_router()
    genuine = Sender("sgw0", SGW0).register(record())
    assert r.on_control(genuine, 0.0, WALL) is not None
    before = r.services(0.1)
    attacker = Sender("sgw0", "198.19.66.6", key=reg.Key("deployment", b"\x09" * 32))
    team = reg.Key("team-db", b"\x05" * 32, ("db.*",))
    r.verifier.keys[team.key_id] = team
    foreign = Sender("db0", "198.19.66.7", key=team).register(record())
    assert r.on_control(attacker.register(record(weight=100)), 0.1, WALL) is None      # forged: no answer
    assert r.on_control(genuine, 0.1, WALL) is None                                     # replayed
    assert reg.decode(r.on_control(foreign, 0.1, WALL), team.secret).status == 1        # not the owner
    assert r.services(0.1) == before
    assert (r.stats["refused_bad_mac"], r.stats["refused_replay"], r.stats["refused_not_owner"]) == (1, 1, 1)


def test_not_owner_gets_a_refusal_ack():
    r = make_router()
    team = reg.Key("team-db", b"\x05" * 32, ("db.*",))
    r.verifier.keys[team.key_id] = team
    reply = r.on_control(Sender("db0", "198.19.66.7", key=team).register(record()), 0.0, WALL)
    assert reg.decode(reply, team.secret).status == 1 and r.services(0.0) == []


def test_drop_and_delay_rules():
    r = make_router(delay_hold=1.0)
    r.add_rule(ServicePrefix(service_id_for("blocked", 80)), Action.DROP)
    assert r.on_packet(sal_syn(sid=service_id_for("blocked", 80)), 0.0) is None
    assert r.stats["dropped_by_rule"] == 1
    r.add_rule(ServicePrefix(SID), Action.DELAY, priority=0, name="web (held)")
    assert r.on_packet(sal_syn(flow=1), 0.0) is None and r.on_packet(sal_syn(flow=2), 0.1) is None
    assert r.on_packet(sal_syn(flow=2), 0.2) is None and len(r.held) == 2     # a repeat replaces
    sgw0 = Sender("sgw0", SGW0)
    r.on_control(sgw0.register(record()), 0.5, WALL)        # priority 1 beats the DELAY
    assert [ntoa(IPv4(p).dst) for p in r.outbox] == [SGW0, SGW0] and not r.held
    r.outbox.clear()
    r.on_control(sgw0.unregister(), 0.6, WALL)
    assert r.on_packet(sal_syn(flow=3), 0.6) is None
    r.handle_timer(1.7)
    assert not r.held and r.stats["dropped_delay_expired"] == 1 and not r.outbox


def test_repeated_syn_sticks_to_its_instance_while_registered():
    r = make_router(seed=3, affinity=3.0)
    sgw0 = Sender("sgw0", SGW0)
    r.on_control(sgw0.register(record()), 0.0, WALL)
    r.on_control(Sender("sgw1", SGW1).register(record()), 0.0, WALL)
    first = {i: IPv4(r.on_packet(sal_syn(flow=i), 0.0)).dst for i in range(1, 40)}
    assert all(IPv4(r.on_packet(sal_syn(flow=i), 1.0)).dst == d for i, d in first.items())
    on_sgw0 = [i for i, d in first.items() if d == aton(SGW0)]
    r.on_control(sgw0.unregister(), 1.0, WALL)
    assert all(IPv4(r.on_packet(sal_syn(flow=i), 1.1)).dst == aton(SGW1) for i in on_sgw0)


def test_only_first_syns_are_forwarded():
    r = make_router()
    r.on_control(Sender("sgw0", SGW0).register(record()), 0.0, WALL)
    data = wire.SalHeader(1, 2, 6, []).encode() + bytes(20)
    pkt = make_carriage("ip", "client").wrap(aton(CGW), aton(ROUTER), data, 0)
    assert r.on_packet(pkt, 0.0) is None and r.stats["dropped_not_a_syn"] == 1
    bad = bytearray(sal_syn())
    bad[30] ^= 0xFF                                          # SAL checksum no longer matches
    assert r.on_packet(bytes(bad), 0.0) is None and r.stats["dropped_sal_bad_checksum"] == 1
    tcp = tcp_packet("198.19.1.2", 1, ROUTER, 2, 0)
    assert r.on_packet(tcp, 0.0) is PASS


def test_probe_answers_ready_after_warmup_and_names():
    r = make_router(warmup=0.5)
    probe = reg.Signer(KEY, "cgw")
    assert reg.decode(r.on_control(probe.message(reg.PROBE, WALL)[0], 0.1, WALL), SECRET).status == 0
    assert reg.decode(r.on_control(probe.message(reg.PROBE, WALL)[0], 0.6, WALL), SECRET).status == 1
    r.on_control(Sender("sgw0", SGW0).register(record()), 0.6, WALL)
    r.on_control(Sender("sgw1", SGW1).register(record(), reg.Record("db", ServicePrefix(service_id_for("db"), 224))), 0.6, WALL)
    assert r.names() == [
        {"name": "db", "service_id": service_id_for("db").hex(), "prefix_bits": 224, "port": None, "instances": 1},
        {"name": "web.svc.example", "service_id": SID.hex(), "prefix_bits": 256, "port": 80, "instances": 2}]


def test_router_config():
    cfg = parse_config({"router": {"instance": "r0", "address": ROUTER, "warmup": 0.2},
                        "key": [{"id": "deployment", "key": "11" * 32}, {"id": "team", "key": "22" * 16, "names": ["db.*"]}],
                        "rule": [{"service": "blocked:80", "action": "drop"},
                                 {"prefix": "default", "action": "forward", "next_hop": "198.19.50.1", "priority": 0}]},
                       "router.toml")
    assert cfg.options.address == aton(ROUTER) and cfg.options.warmup == 0.2
    assert [k.names for k in cfg.keys] == [("*",), ("db.*",)]
    assert cfg.rules[0].prefix == ServicePrefix(service_id_for("blocked", 80)) and cfg.rules[1].prefix.bits == 0
    for bad in ({"router": {}}, {"router": {"bogus": 1}, "key": [{"key": "11" * 32}]},
                {"key": [{"key": "11" * 8}]}, {"key": [{"key": "11" * 32}], "rule": [{"service": "x", "action": "demux"}]}):
        with pytest.raises(RouterConfigError):
            parse_config(bad, "router.toml")
