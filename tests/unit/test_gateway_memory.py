"""A whole Gateway in memory (fake adapters, Twisted's MemoryReactorClock): start and
stop, and the service table's one owner across reloads, router health, drain and
backend health."""
import os
import textwrap

import pytest
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from gateway.config import load
from gateway.daemon import Gateway
from sal import registration as reg
from sal import wire
from sal.ip import IPv4, ntoa
from sal.serviceid import service_id_for
from tests.unit import gateway_fakes as fakes
from tests.unit.packets import SYN, tcp_packet

KEY = "ab" * 32
R1, R2 = "198.19.20.1", "198.19.21.1"
SID = service_id_for("web.svc.example", 80)

CLIENT = """
[gateway]
instance = "cgw-test"
queue = 7
sal_address = "198.19.1.1"
control_socket = "{dir}/client.sock"
state_dir = "{dir}"
{extra}
[[service]]
name = "web.svc.example"
address = "198.18.0.10"
port = 80

[routing]
routers = ["{r1}", "{r2}"]
key = "{key}"
probe_interval = 0.1
probe_misses = 3
"""

SERVER = """
[gateway]
instance = "sgw-test"
queue = 9
sal_address = "198.19.30.1"
control_socket = "{dir}/server.sock"
state_dir = "{dir}"
{extra}
[[service]]
name = "web.svc.example"
port = 80
backend = "198.19.3.2:8080"

[routing]
routers = ["{r1}"]
key = "{key}"
refresh_interval = 0.05
[routing.health]
interval = 0.1
rise = 2
fall = 2
"""


def write(tmp_path, template, extra=""):
    path = tmp_path / ("gw.toml")
    path.write_text(textwrap.dedent(template.format(dir=tmp_path, r1=R1, r2=R2, key=KEY, extra=extra)))
    return str(path)


def client_net():
    return fakes.Net({"198.19.1.1": "eth0", "198.19.0.1": "lan0"},
                     [("198.19.0.0/16", "198.19.1.1", "eth0"), ("198.19.0.0/24", "198.19.0.1", "lan0")],
                     {"eth0", "lan0"})


def server_net():
    return fakes.Net({"198.19.30.1": "eth0", "198.19.3.1": "back0"},
                     [("198.19.0.0/16", "198.19.30.1", "eth0"), ("198.19.3.0/24", "198.19.3.1", "back0")],
                     {"eth0", "back0"})


def start(tmp_path, template, role, net):
    reactor = fakes.Reactor()
    gw = Gateway(load(write(tmp_path, template), role), reactor, fakes.adapters(net, reactor))
    gw.start()
    return gw, reactor


def advance(reactor, seconds, step=0.01):
    for _ in range(round(seconds / step)):
        reactor.advance(step)


def default_rule(gw):
    return sorted(t.target for e in gw.translator.table.entries() if e.prefix.bits == 0 for t in e.targets)


def answer_probes(gw, reactor, routers):
    """The routers in ``routers`` answer every probe sent so far (PROBE_ACK, ready)."""
    key = gw.cfg.routing.key
    (udp,) = reactor.udp
    for data, addr in udp.written:
        if addr[0] in routers:
            probe = reg.decode(data, key.secret)
            ack = reg.Message(reg.PROBE_ACK, probe.seq + 1, key.key_id, "router", acked_seq=probe.seq, status=1)
            udp.deliver(reg.encode(ack, key.secret), addr)
    udp.written.clear()


def run_with_live(gw, reactor, routers, seconds):
    for _ in range(round(seconds / 0.05)):
        advance(reactor, 0.05)
        answer_probes(gw, reactor, routers)


def syn_goes_to(gw, port=40000):
    """Where a new connection's SAL SYN is sent."""
    verdict = gw.control_reader.packet(tcp_packet("198.19.0.5", port, "198.18.0.10", 80, 1, flags=SYN, mss=1400))
    pkt = verdict if isinstance(verdict, bytes) else gw.injector.sent.pop()
    hdr, _ = wire.decode(pkt[20:])
    assert hdr.flags == wire.SYN
    return ntoa(IPv4(pkt).dst)


# --- start and stop --------------------------------------------------------------------------

def test_start_and_stop_in_memory(tmp_path):
    gw, reactor = start(tmp_path, CLIENT, "client", client_net())
    assert gw.interception.plan["prerouting"] and gw.interception.plan["output"]
    assert {r.queue for r in (gw.reader, gw.control_reader, gw.syn_reader)} == {7, 1007, 2007}
    assert {gw.reader, gw.control_reader, gw.syn_reader, gw.watcher} <= reactor.readers
    # new connections' SYNs (a LAN client's, and SAL SYNs: destination flowID 0) have a
    # queue of their own, so that a SYN flood does not hold up handshakes in progress
    queues = {" ".join(r.match): r.queue for r in gw.interception.plan["prerouting"] if hasattr(r, "queue")}
    assert queues["-p tcp -d 198.18.0.0/16 --tcp-flags SYN SYN"] == 2007
    (sal_syn,) = [m for m in queues if m.startswith("-p 144") and "@4=0" in m]
    assert queues[sal_syn] == 2007 and list(queues).index(sal_syn) == 0
    assert [s[0] for s in reactor.unixServers] == [f"{tmp_path}/client.sock"]
    assert default_rule(gw) == [R1, R2]
    assert syn_goes_to(gw) in (R1, R2)
    assert reactor.getDelayedCalls()                      # timers: retransmission, probes, snapshot
    interception, readers, watcher, injector = \
        gw.interception, (gw.reader, gw.control_reader, gw.syn_reader), gw.watcher, gw.injector
    gw.stop()
    assert interception.removed and injector.closed and watcher.closed
    assert all(r.closed for r in readers) and not reactor.readers
    assert [c for c in reactor.getDelayedCalls() if c.active()] == []
    gw.stop()                                             # twice is fine


# --- reload x router health ------------------------------------------------------------------

def test_reload_keeps_a_down_router_out_of_the_default_rule(tmp_path):
    gw, reactor = start(tmp_path, CLIENT, "client", client_net())
    run_with_live(gw, reactor, {R2}, 0.6)                 # R1 never answers: down after 3 probes
    assert default_rule(gw) == [R2]
    write(tmp_path, CLIENT, extra="log_level = \"debug\"")
    gw.reload()
    assert gw.cfg.log_level == "debug"                    # the reload was taken ...
    assert default_rule(gw) == [R2]                       # ... and the dead router stays out
    assert {syn_goes_to(gw, 40000 + n) for n in range(10)} == {R2}
    run_with_live(gw, reactor, {R1, R2}, 0.2)             # R1 is back: it returns
    assert default_rule(gw) == [R1, R2]
    gw.stop()


def test_reload_that_changes_routing_is_refused(tmp_path):
    gw, reactor = start(tmp_path, CLIENT, "client", client_net())
    write(tmp_path, CLIENT.replace("probe_misses = 3", "probe_misses = 5"))
    gw.reload()
    assert gw.cfg.routing.probe_misses == 3
    gw.stop()


# --- server: drain, health, reload ---------------------------------------------------------

class Backend:
    """Answers the gateway's health checks (TCP connects) as the test says."""

    def __init__(self, reactor):
        self.reactor, self.seen = reactor, 0

    def answer(self, ok: bool) -> int:
        pending = self.reactor.tcpClients[self.seen:]
        self.seen = len(self.reactor.tcpClients)
        for host, port, factory, _, _ in pending:
            assert (host, port) == ("198.19.3.2", 8080)
            if ok:
                factory.buildProtocol(None).makeConnection(StringTransport())
            else:
                factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        return len(pending)

    def run(self, ok: bool, seconds: float) -> None:
        for _ in range(round(seconds / 0.05)):
            advance(self.reactor, 0.05)
            self.answer(ok)


def in_table(gw) -> bool:
    return gw.translator.table.match(SID) is not None


def state(gw) -> str:
    (row,) = gw.commands()["services"]()
    return row["state"]


def test_reload_keeps_a_drained_service_drained(tmp_path):
    gw, reactor = start(tmp_path, SERVER, "server", server_net())
    backend = Backend(reactor)
    backend.run(True, 0.2)
    assert in_table(gw) and state(gw) == "registered"
    gw.commands()["drain"]("web.svc.example")
    assert not in_table(gw) and state(gw) == "draining"
    write(tmp_path, SERVER, extra="log_level = \"debug\"")
    gw.reload()
    assert gw.cfg.log_level == "debug"
    assert not in_table(gw) and state(gw) == "draining"
    backend.run(True, 0.3)
    assert not in_table(gw)
    gw.commands()["drain"]("web.svc.example", cancel=True)
    assert in_table(gw) and state(gw) == "registered"
    gw.stop()


def test_health_changes_while_draining_keep_the_service_out(tmp_path):
    gw, reactor = start(tmp_path, SERVER, "server", server_net())
    backend = Backend(reactor)
    backend.run(True, 0.2)
    gw.commands()["drain"]("web.svc.example")
    backend.run(False, 0.4)                               # the backend fails ...
    assert gw.routing.checks[("198.19.3.2", 8080)].state == "down"
    assert not in_table(gw)
    backend.run(True, 0.4)                                # ... and recovers, still drained
    assert gw.routing.checks[("198.19.3.2", 8080)].state == "up"
    assert not in_table(gw) and state(gw) == "draining"
    gw.commands()["drain"]("web.svc.example", cancel=True)
    assert in_table(gw)
    # and the other way round: a drain cancelled while the backend is down keeps it out
    backend.run(False, 0.4)
    assert not in_table(gw)
    gw.commands()["drain"]("web.svc.example")
    gw.commands()["drain"]("web.svc.example", cancel=True)
    assert not in_table(gw) and state(gw) == "withdrawn"
    backend.run(True, 0.4)
    assert in_table(gw) and state(gw) == "registered"
    gw.stop()


def test_registrations_follow_drain_and_health(tmp_path):
    gw, reactor = start(tmp_path, SERVER, "server", server_net())
    backend = Backend(reactor)
    backend.run(True, 0.2)
    (udp,) = reactor.udp
    key = gw.cfg.routing.key

    def last_register():
        msgs = [reg.decode(d, key.secret) for d, addr in udp.written if addr == (R1, reg.DEFAULT_PORT)]
        return [m for m in msgs if m.type == reg.REGISTER][-1]

    assert [r.name for r in last_register().records] == ["web.svc.example"]
    gw.commands()["drain"]("web.svc.example")
    write(tmp_path, SERVER)
    gw.reload()
    udp.written.clear()
    backend.run(True, 0.2)
    assert last_register().records == []                  # still withdrawn from the router
    gw.stop()


# --- mobility: the daemon gathers, gateway/paths.py decides, the translator moves -----------

PLAIN_SERVER = """
[gateway]
instance = "sgw-move"
queue = 11
control_socket = "{dir}/move.sock"
state_dir = "{dir}"
{extra}
[[service]]
name = "web.svc.example"
port = 80
backend = "198.19.3.2:8080"
"""


def test_a_link_event_moves_a_flow_only_when_its_own_path_changed(tmp_path):
    """The server gateway (198.19.2.2 on eth0, 198.19.7.2 on eth1) has a flow with a peer
    that then moves onto eth1's subnet. An unrelated link event moves nothing; losing
    the flow's own address does."""
    from sal.ip import aton
    from tests.unit.test_translate import handshake, make_pair

    net = fakes.Net({"198.19.2.2": "eth0", "198.19.7.2": "eth1", "198.19.3.1": "back0"},
                    [("198.19.2.0/24", "198.19.2.2", "eth0"), ("198.19.7.0/24", "198.19.7.2", "eth1"),
                     ("198.19.3.0/24", "198.19.3.1", "back0")], {"eth0", "eth1", "back0"})
    gw, reactor = start(tmp_path, PLAIN_SERVER, "server", net)
    client, _ = make_pair()
    handshake(client, gw.translator)
    (flow,) = gw.translator.flows.values()

    def event():
        gw.watcher.on_change(1)
        reactor.advance(0.01)

    event()                                              # a look while all is as set up
    assert gw.stats.get("migrations_started", 0) == 0
    # the peer moves to 198.19.7.5 (eth1's subnet): RSYN, RSYN|ACK, ACK
    client.migrate(0.1, aton("198.19.7.5"))
    rsyn = client.outbox.pop()
    assert gw.control_reader.packet(rsyn) is None
    client.from_sal(gw.injector.sent.pop(), 0.1)
    gw.control_reader.packet(client.outbox.pop())
    assert flow.peer_addr == aton("198.19.7.5") and flow.local_addr == aton("198.19.2.2")
    event()                                              # a capture leaves promiscuous mode
    assert gw.stats.get("migrations_started", 0) == 0 and flow.local_addr == aton("198.19.2.2")
    del net.addresses["198.19.2.2"]                      # our own address goes: that moves it
    net.routes = [r for r in net.routes if r[1] != "198.19.2.2"]
    event()
    assert gw.stats["migrations_started"] == 1 and flow.local_addr == aton("198.19.7.2")
    gw.stop()


# --- health from live traffic --------------------------------------------------------------



def passive_server(tmp_path, health):
    text = SERVER.replace("[routing.health]\ninterval = 0.1\n", "[routing.health]\n" + health + "\ninterval = 0.1\n")
    net = fakes.Net({"198.19.2.2": "eth0", "198.19.3.1": "back0"},
                    [("198.19.0.0/16", "198.19.2.2", "eth0"), ("198.19.3.0/24", "198.19.3.1", "back0")],
                    {"eth0", "back0"})
    return start(tmp_path, text, "server", net)


def connect(gw, client, cport, backend_answers: bool):
    """A real connection through the server gateway; the backend accepts or refuses it."""
    from tests.unit.packets import ACK, RST
    from tests.unit.test_translate import SERVER as BACKEND, SGW_LAN
    sal_syn = client.from_legacy(tcp_packet("198.19.1.2", cport, "198.18.0.10", 80, 1000, flags=SYN, mss=1460), 0.0)
    to_backend = gw.control_reader.packet(sal_syn)
    lport = int.from_bytes(to_backend[20:22], "big")
    if backend_answers:
        synack = tcp_packet(BACKEND, 8080, SGW_LAN, lport, 5000, 1001, SYN | ACK, mss=1460)
        client.from_sal(gw.control_reader.packet(synack), 0.0)
        ack = client.from_legacy(tcp_packet("198.19.1.2", cport, "198.18.0.10", 80, 1001, 5001, ACK), 0.0)
        gw.reader.packet(ack)
    else:
        gw.control_reader.packet(tcp_packet(BACKEND, 8080, SGW_LAN, lport, 0, 1001, RST | ACK))


def test_passive_only_health_learns_from_refused_connections(tmp_path):
    from tests.unit.test_translate import make_pair
    gw, reactor = passive_server(tmp_path, 'kind = "none"\neject_time = 2')
    client, _ = make_pair()
    advance(reactor, 0.1)
    assert state(gw) == "registered" and in_table(gw)     # offered without a probe
    connect(gw, client, 40001, True)
    connect(gw, client, 40002, False)
    assert in_table(gw)                                   # one refusal: fall is 2
    connect(gw, client, 40003, False)
    assert not in_table(gw) and state(gw) == "withdrawn"
    advance(reactor, 1.5)
    assert not in_table(gw)
    advance(reactor, 0.6)                                 # the ejection is over: offered again
    assert in_table(gw) and state(gw) == "registered"
    assert reactor.tcpClients == []                       # and not one probe
    gw.stop()


def test_live_traffic_keeps_tcp_probes_rare(tmp_path):
    from tests.unit.test_translate import make_pair
    gw, reactor = passive_server(tmp_path, 'kind = "tcp"')
    gw.routing.checks[("198.19.3.2", 8080)].interval = 1.0
    backend = Backend(reactor)
    backend.run(True, 0.1)                                # the first probe decides
    client, _ = make_pair()
    for n in range(20):                                   # a connection every 0.1 s for 2 s
        connect(gw, client, 41000 + n, True)
        backend.run(True, 0.1)
    assert len(reactor.tcpClients) == 1
    connect(gw, client, 42000, False)                     # a refusal: probe at once
    advance(reactor, 0.02)
    assert len(reactor.tcpClients) == 2
    gw.stop()


# --- restarts --------------------------------------------------------------------------------

def test_a_snapshot_is_resumed_only_in_the_namespace_that_wrote_it(tmp_path):
    """A clean stop leaves the live flows for a quick restart, in a file named by the
    namespace's inode. A namespace made after that one was deleted may get the same
    inode: its gateway must not take the dead namespace's flows for its own (they would
    answer its new connections with old flowIDs)."""
    import json
    from nat.state import netns_cookie
    from tests.unit.test_translate import handshake, make_pair

    net = fakes.Net({"198.19.2.2": "eth0", "198.19.3.1": "back0"},
                    [("198.19.2.0/24", "198.19.2.2", "eth0"), ("198.19.3.0/24", "198.19.3.1", "back0")],
                    {"eth0", "back0"})
    gw, _ = start(tmp_path, PLAIN_SERVER, "server", net)
    handshake(make_pair()[0], gw.translator)
    gw.stop()
    path = gw.snapshot_path()
    data = json.loads(open(path).read())
    assert data["netns"] == netns_cookie() and len(data["flows"]) == 1

    again, _ = start(tmp_path, PLAIN_SERVER, "server", net)
    assert again.stats["flows_resumed"] == 1              # the same namespace: its own flows
    again.stop()

    data = json.loads(open(path).read())
    open(path, "w").write(json.dumps({**data, "netns": data["netns"] + 1}))
    fresh, _ = start(tmp_path, PLAIN_SERVER, "server", net)
    assert fresh.stats.get("flows_resumed", 0) == 0 and not fresh.translator.flows
    assert not os.path.exists(path)
    fresh.stop()


# --- this host's own connections ---------------------------------------------------------------

class LocalFastPath:
    """What the daemon asks of a fast path (one on loopback too)."""
    loopback = True
    links: dict = {}

    def handle(self, events):
        pass

    def attach(self, interfaces):
        pass

    def sweep(self):
        return 0

    def refresh_all(self):
        pass

    def stats(self):
        return {}

    def stop(self):
        self.stopped = True


def test_own_connections_are_queued_in_output_unless_the_kernel_takes_them(tmp_path):
    """OUTPUT runs before the fast path could see this host's TCP toward the virtual
    range. With the fast path on, that TCP is routed through lo (where its super-packets
    are cut wire-sized and the fast path meets them coming in) and queued only as it comes
    in there, failing closed; without it, OUTPUT queues it."""
    def own_tcp(rules):
        return [r for r in rules if "tcp" in list(getattr(r, "match", r)) and "198.18.0.0/16" in list(getattr(r, "match", r))]

    gw, _ = start(tmp_path, CLIENT, "client", client_net())
    slow = gw.interception.plan
    assert len(own_tcp(slow["output"])) == 2                              # the SYN and the rest
    assert not [r for r in own_tcp(slow["prerouting"]) if "lo" in list(getattr(r, "match", r))]
    (route,) = slow["routes"]
    assert route["dst"] == "198.18.0.0/16" and route["dev"] == "eth0"
    gw.stop()

    reactor = fakes.Reactor()
    net = client_net()
    net.routes.append(("0.0.0.0/0", "198.19.1.1", "eth0"))               # a default route
    adapters = fakes.adapters(net, reactor)
    fast = LocalFastPath()
    adapters.fast_path = lambda cfg, translator, interfaces: fast
    gw = Gateway(load(write(tmp_path, CLIENT), "client"), reactor, adapters)
    gw.start()
    plan = gw.interception.plan
    assert own_tcp(plan["output"]) == []
    from_lo = own_tcp(plan["prerouting"])[:2]
    assert all(r.match[:2] == ["-i", "lo"] and r.bypass is False for r in from_lo), from_lo
    assert [r.queue for r in from_lo] == [gw.cfg.new_flow_queue, gw.cfg.queue]
    # its UDP too: in on lo, failing closed, and nothing of it in OUTPUT
    (own_udp,) = [r for r in plan["prerouting"] if list(getattr(r, "match", r))[:4] == ["-i", "lo", "-p", "udp"]]
    assert own_udp.bypass is False and own_udp.queue == gw.cfg.queue
    assert not [r for r in plan["output"] if "udp" in list(getattr(r, "match", r))]
    (route,) = plan["routes"]                                             # even beside a default route
    assert route == {"dst": "198.18.0.0/16", "dev": "lo", "prefsrc": "198.19.1.1"}
    gw.stop()
    assert fast.stopped


def draining_with(tmp_path, udp):
    """A client gateway holding one open flow (UDP or TCP), drained as SIGTERM does."""
    from types import SimpleNamespace
    gw, reactor = start(tmp_path, CLIENT, "client", client_net())
    gw.translator.flows[99] = SimpleNamespace(closed_at=None, udp=udp)
    gw.drain_and_stop()
    return gw, reactor


def test_a_drain_waits_for_an_open_connection_up_to_drain_timeout(tmp_path):
    gw, reactor = draining_with(tmp_path, udp=None)
    advance(reactor, gw.cfg.drain_timeout - 0.2)
    assert not reactor.hasStopped
    advance(reactor, 0.3)
    assert reactor.hasStopped


def test_a_drain_does_not_wait_for_udp_flows(tmp_path):
    """A UDP flow ends only by going idle: waiting would not hasten it (it is saved
    for a quick restart instead)."""
    gw, reactor = draining_with(tmp_path, udp=object())
    assert reactor.hasStopped
