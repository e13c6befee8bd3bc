"""The TFTP helper (gateway/translate/tftp.py) in memory: a TFTP conversation through a
client and a server translator, the server answering from new ports (its transfer IDs)
as tftpd does, and what the helper refuses."""
import struct
from types import SimpleNamespace

import pytest

from gateway.translate import Backend, ClientTranslator, PASS, ServerTranslator, Timeouts
from gateway.translate.carriage import make_carriage
from sal.checksum import apply_delta
from sal.ip import aton
from sal.serviceid import ServicePrefix, service_id_for
from sal.service_table import Action, ServiceTable
from tests.unit.test_udp_flows import CGW, CLIENT, SERVER, SGW, SGW_LAN, VIP, check_sal, check_udp, take, udp_packet

SID = service_id_for("tftp.svc.example", 69)
PLAIN_SID = service_id_for("plain.svc.example", 69)
PLAIN_VIP = "198.18.0.70"
CPORT = 40000


def rrq(name: bytes = b"big.bin") -> bytes:
    return b"\0\x01" + name + b"\0octet\0"


def wrq(name: bytes = b"up.bin") -> bytes:
    return b"\0\x02" + name + b"\0octet\0"


def data(block: int, payload: bytes = b"x" * 512) -> bytes:
    return struct.pack("!HH", 3, block) + payload


def ack(block: int) -> bytes:
    return struct.pack("!HH", 4, block)


def make_pair(carriage="ip"):
    ctable = ServiceTable()
    ctable.add(ServicePrefix(SID, 224), Action.FORWARD, SGW)
    ctable.add(ServicePrefix(PLAIN_SID, 224), Action.FORWARD, SGW)
    services = {(aton(VIP), 69): SID, (aton(PLAIN_VIP), 69): PLAIN_SID}
    client = ClientTranslator(aton(CGW), lambda a, p: None, ctable, make_carriage(carriage, "client"),
                              timeouts=Timeouts(), resolve_udp=lambda a, p: services.get((a, p)))
    stable = ServiceTable()
    stable.add(ServicePrefix(SID), Action.DEMUX, Backend(aton(SERVER), 69, aton(SGW_LAN), "tftp", 17, "tftp"))
    stable.add(ServicePrefix(PLAIN_SID), Action.DEMUX, Backend(aton(SERVER), 6969, aton(SGW_LAN), "plain", 17))
    server = ServerTranslator(stable, make_carriage(carriage, "server"), timeouts=Timeouts())
    return client, server


class Conversation:
    """The legacy client's and the backend's sides of one client port's flow."""

    def __init__(self, carriage="ip", vip=VIP):
        self.client, self.server = make_pair(carriage)
        self.vip, self.now = vip, 0.0
        self.ours = None                     # our port toward the backend

    def send(self, payload: bytes):
        """The legacy client sends toward vip:69: (backend port it reaches, payload)."""
        self.now += 0.01
        c, s = self.client, self.server
        out = c.from_legacy_udp(udp_packet(CLIENT, CPORT, self.vip, 69, payload), self.now)
        if out is None:                      # the first: held for the handshake
            (syn,) = take(c)
            assert s.from_sal(syn, self.now) is None
            (synack,) = take(s)
            assert c.from_sal(synack, self.now) is None
            ack_, out = take(c)
            assert s.from_sal(ack_, self.now) is None
        sport, dport, got = check_udp(s.from_sal(out, self.now), SGW_LAN, SERVER)
        assert self.ours in (None, sport)
        self.ours = sport
        return dport, got

    def reply(self, from_port: int, payload: bytes, to_port: int | None = None):
        """The backend sends from ``from_port``: what the legacy client gets
        ((source port, payload) from the vip), or the server translator's verdict."""
        self.now += 0.01
        out = self.server.from_backend_udp(
            udp_packet(SERVER, from_port, SGW_LAN, to_port or self.ours, payload), self.now)
        if not isinstance(out, bytes):
            return out
        check_sal(out)
        sport, dport, got = check_udp(self.client.from_sal(out, self.now), self.vip, CLIENT)
        assert dport == CPORT
        return sport, got


@pytest.mark.parametrize("carriage", ["ip", "udp"])
def test_a_read_answered_from_a_new_port_is_one_flow_to_the_client(carriage):
    t = Conversation(carriage)
    assert t.send(rrq()) == (69, rrq())
    # tftpd answers from its transfer ID: the client sees the virtual address:69
    assert t.reply(50001, data(1)) == (69, data(1))
    for block in range(1, 6):
        assert t.send(ack(block)) == (50001, ack(block))            # to the transfer ID
        assert t.reply(50001, data(block + 1)) == (69, data(block + 1))
    assert t.send(ack(6)) == (50001, ack(6))
    s = t.server.stats
    assert s["tftp_requests"] == 1 and s["tftp_transfer_ports"] == 1
    assert len(t.server.flows) == len(t.client.flows) == 1
    # the service's own port is no longer the flow's: a datagram from it is not taken
    assert t.reply(69, data(7)) is None and s["dropped_tftp_unexpected_port"] == 1


def test_the_next_request_goes_to_the_service_port_and_takes_a_new_transfer_id():
    t = Conversation()
    t.send(rrq())
    assert t.reply(50001, data(1, b"end")) == (69, data(1, b"end"))
    assert t.send(ack(1)) == (50001, ack(1))
    # the same client port asks again (tftp's interactive mode): to port 69, not 50001
    assert t.send(wrq()) == (69, wrq())
    assert t.reply(50002, ack(0)) == (69, ack(0))
    assert t.send(data(1, b"up")) == (50002, data(1, b"up"))
    # the old transfer ID is not the flow's any more
    assert t.reply(50001, data(2)) is None
    assert t.server.stats["tftp_transfer_ports"] == 2 and t.server.stats["dropped_tftp_unexpected_port"] == 1


def test_only_the_first_answer_to_a_request_takes_the_flow():
    t = Conversation()
    t.send(rrq())
    assert t.reply(50001, data(1)) == (69, data(1))
    # a second server process answering a retransmitted request: dropped, counted
    assert t.reply(50002, data(1)) is None
    assert t.server.stats["dropped_tftp_unexpected_port"] == 1
    assert t.send(ack(1)) == (50001, ack(1))


def test_a_new_port_before_any_request_is_dropped():
    t = Conversation()
    assert t.send(ack(0)) == (69, ack(0))              # not a request: nothing armed
    assert t.reply(50001, data(1)) is None
    assert t.server.stats["dropped_tftp_unexpected_port"] == 1 and not t.server.stats["tftp_transfer_ports"]
    # from the flow's own port, it is carried as ever
    assert t.reply(69, data(1)) == (69, data(1))


def test_a_malformed_answer_from_a_new_port_does_not_take_the_flow():
    t = Conversation()
    t.send(rrq())
    good = udp_packet(SERVER, 50001, SGW_LAN, t.ours, data(1))
    bad = good[:24] + struct.pack("!H", len(good) - 20 + 4) + good[26:]     # UDP length disagrees
    assert t.server.from_backend_udp(bad, 1.0) is None
    assert t.server.stats["dropped_udp_bad_length"] == 1 and not t.server.stats["tftp_transfer_ports"]
    assert t.reply(50001, data(1)) == (69, data(1))        # still armed: the good one is taken


def test_what_is_no_helper_flows_business_is_left_as_before():
    t = Conversation()
    t.send(rrq())
    # another of our ports (no flow): the kernel's, as before
    assert t.reply(50001, data(1), to_port=t.ours + 1 if t.ours < 32767 else t.ours - 1) is PASS
    # another host: not the backend (the helper keys on the backend's address)
    out = t.server.from_backend_udp(udp_packet("198.19.3.9", 50001, SGW_LAN, t.ours, data(1)), 1.0)
    assert out is PASS
    # a service without the helper: an answer from a new port is not its flow's
    p = Conversation(vip=PLAIN_VIP)
    assert p.send(rrq()) == (6969, rrq())
    assert p.reply(50001, data(1)) is PASS
    assert not p.server.tftp.flows and not p.server.stats["tftp_requests"]


def test_a_forgotten_flow_leaves_the_helper():
    t = Conversation()
    t.send(rrq())
    t.reply(50001, data(1))
    assert len(t.server.tftp.flows) == 1
    idle = t.now + Timeouts().udp_idle + 1
    t.server.handle_timer(idle)
    t.server.handle_timer(idle + 120)
    assert not t.server.flows and not t.server.tftp.flows and not t.server.udp_flows


def test_a_checksum_delta_for_other_addresses_follows_the_new_port():
    """A datagram sent to our old address during a move carries its own delta: it is
    corrected for the port the request re-aims the flow at."""
    t = Conversation()
    t.send(rrq())
    t.reply(50001, data(1))
    s = t.server
    (flow,) = s.flows.values()
    elsewhere = SimpleNamespace(src=aton("198.19.9.9"), dst=flow.local_addr)
    before = s._in_delta_for(flow, elsewhere)
    got = s.tftp.toward_backend(s, flow, b"\0" * 8 + rrq(), before)
    assert flow.legacy_sport == 69
    after = s._in_delta_for(flow, elsewhere)
    assert apply_delta(0x1234, got) == apply_delta(0x1234, after) != apply_delta(0x1234, before)


# --- config and rules ------------------------------------------------------------------

SERVER_TOML = '''[gateway]
instance = "t"
queue = 1

[[service]]
name = "tftp.svc.example"
port = 69
protocol = "udp"
backend = "198.19.3.2:69"
helper = "tftp"

[[service]]
name = "dns.svc.example"
port = 53
protocol = "udp"
backend = "198.19.3.2:5300"
'''


def test_the_daemon_builds_the_helper_and_queues_the_backends_answers_from_any_port(tmp_path):
    from gateway.config import load
    from gateway.daemon import build_translator, interception_plan
    from gateway.table_owner import config_rules
    (tmp_path / "s.toml").write_text(SERVER_TOML)
    cfg = load(str(tmp_path / "s.toml"), "server")
    assert [s.helper for s in cfg.services] == ["tftp", ""]
    source = lambda host: ("198.19.3.1", "lan0")              # noqa: E731
    server = build_translator(cfg, source, {"lan0": 1500})
    assert [server.table.resolve(s.service_id).target.helper for s in cfg.services] == ["tftp", ""]
    assert [r.target.helper for r in config_rules(cfg, source)] == ["tftp", ""]     # (what the daemon installs)
    plan = interception_plan(cfg, server, ["lan0"], lambda c: None)
    udp_rules = [(r.match, r.queue, r.bypass) for r in plan["prerouting"] if "udp" in getattr(r, "match", ())]
    assert udp_rules == [
        (["-p", "udp", "-s", "198.19.3.2", "--dport", "1024:32767"], cfg.queue, False),     # any port, closed
        (["-p", "udp", "-s", "198.19.3.2", "--sport", "5300", "--dport", "1024:32767"], cfg.queue, False)]


@pytest.mark.parametrize("role, text, line, words", [
    ("server", SERVER_TOML.replace('helper = "tftp"', 'helper = "ftp"'), 10, 'helper must be "tftp", not \'ftp\''),
    ("server", SERVER_TOML.replace('helper = "tftp"', "helper = true"), 10, 'helper must be "tftp"'),
    ("server", SERVER_TOML.replace('protocol = "udp"\nbackend = "198.19.3.2:69"', 'backend = "198.19.3.2:69"'),
     9, "'helper' is for a UDP service of a server gateway"),
    ("client", '[gateway]\ninstance = "c"\nqueue = 0\n\n[[service]]\nname = "t"\naddress = "198.18.0.69"\n'
     'port = 69\nprotocol = "udp"\nhelper = "tftp"\n\n[[route]]\nservice = "t"\nnext_hop = "198.19.2.2"\n',
     10, "'helper' is for a UDP service of a server gateway"),
])
def test_a_bad_helper_is_refused_with_its_line(tmp_path, role, text, line, words):
    from gateway.config import ConfigError, load
    path = tmp_path / f"{role}.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load(str(path), role)
    assert f"{role}.toml:{line}:" in str(exc.value) and words in str(exc.value), str(exc.value)


def test_a_helper_flow_stays_out_of_the_snapshot_a_plain_udp_flow_is_in():
    """The helper's state (the transfer's port) is not saved: its flow is left out of
    the server's snapshot rather than resumed toward the wrong port."""
    from gateway.translate import snapshot
    helped, plain = Conversation(), Conversation(vip=PLAIN_VIP)
    helped.send(rrq())
    helped.reply(50001, data(1))
    plain.send(rrq())
    assert snapshot.dump(helped.server, helped.now)["udp_flows"] == []
    assert len(snapshot.dump(plain.server, plain.now)["udp_flows"]) == 1


def test_a_helper_flow_is_never_handed_to_the_kernel_fast_path(tmp_path):
    """Its backend port changes under it (a new transfer ID), which the kernel's flow
    entry would not follow: it stays on the Python path; a plain UDP flow does not."""
    from gateway.fastpath.manager import FastPath
    helped, plain = Conversation(), Conversation(vip=PLAIN_VIP)
    helped.send(rrq())
    plain.send(rrq())
    for t, eligible in ((helped, False), (plain, True)):
        (flow,) = t.server.flows.values()
        assert FastPath(t.server, "t-tftp", str(tmp_path), 0x10)._eligible(flow) is eligible
