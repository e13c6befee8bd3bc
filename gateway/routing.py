"""A gateway's control plane on the reactor: one UDP socket toward the routers, TCP
health checks, a 10 ms timer, and the ``services`` and ``drain`` control commands.

* Server gateway: a :class:`~gateway.registration.Registrar` (register, refresh,
  withdraw, unregister on stop) fed by :class:`~gateway.health.HealthCheck` per backend.
  A service that is down or drained also leaves the gateway's own table, so a SYN that
  was already on its way is dropped (the client's retransmission goes through a router
  again, to a live instance) instead of reaching a dead backend; flows already set up
  never consult the table and finish undisturbed.
* Client gateway: a :class:`~gateway.router_health.RouterHealth` keeping the default
  rule on the live routers.

Neither writes the service table: each tells the gateway's
:class:`~gateway.table_owner.TableOwner` what it learnt (health, drain, live routers).

Without a [routing] section only ``services`` (a view) and ``drain`` (local) work.
"""
import logging
import secrets

from twisted.internet.protocol import ClientFactory, DatagramProtocol, Protocol

from sal import registration as reg
from sal.ip import aton, ntoa
from sal.serviceid import ServicePrefix, short

from .health import HealthCheck, dns_answered, dns_probe, kind_for
from .registration import Registrar
from .router_health import RouterHealth
from .translate.events import FlowClosed, FlowClosing, FlowEstablished, UdpAnswered, UdpRefused

log = logging.getLogger("serval.routing")
TICK = 0.01
ADDRESS_CHECK = 1.0     # seconds between looks at our own address (when not configured)


def routing_agent(gateway):
    return (ServerAgent if gateway.cfg.role == "server" else ClientAgent)(gateway)


class _Datagrams(DatagramProtocol):
    def __init__(self, on_reply):
        self.on_reply = on_reply

    def datagramReceived(self, data, addr):
        try:
            self.on_reply(data, addr)
        except Exception:   # a bad datagram must never hurt the gateway
            log.exception("reply from %s", addr)


class _Agent:
    def __init__(self, gateway):
        self.gw = gateway
        self.routing = gateway.cfg.routing
        self.udp = self.ticker = None

    def start(self) -> None:
        from twisted.internet.task import LoopingCall
        if self.routing is None:
            return
        # bound to no address: ours may change under us (migration); replies come back
        # to whichever the kernel chose
        self.udp = self.gw.reactor.listenUDP(0, _Datagrams(self._on_reply))
        self.ticker = LoopingCall(self._tick)
        self.ticker.clock = self.gw.reactor
        self.ticker.start(TICK, now=True)

    def stop(self) -> None:
        if self.ticker is not None and self.ticker.running:
            self.ticker.stop()
        if self.udp is not None:
            self.udp.stopListening()
            self.udp = None

    def _send(self, datagrams) -> None:
        for data, router in datagrams:
            try:
                self.udp.write(data, router)
            except OSError as exc:
                self.gw.stats[f"control_send_failed_{exc.errno}"] += 1

    def flow_events(self, events) -> None:
        """The translator's flow events after each batch (what the server's checks learn from)."""

    def _tick(self) -> None:
        try:
            # answers already in the socket first: after a stall of our own (a burst of
            # packets) a timer must not call a router dead whose answer merely waits here
            self.udp.doRead()
            self.tick(self.gw.clock(), self.gw.adapters.wall_ns())
        except Exception:
            log.exception("control plane tick")


class ServerAgent(_Agent):
    def __init__(self, gateway):
        super().__init__(gateway)
        cfg, self.table = gateway.cfg, gateway.table
        self.by_backend: dict[tuple, list] = {}     # _backend_key -> service keys
        for key, rule in self.table.services().items():
            self.by_backend.setdefault(_backend_key(rule.target), []).append(key)
        ports = {svc.key: svc.port for svc in cfg.services}
        self.registrar = self.checks = None
        if self.routing is not None:
            r = self.routing
            address = cfg.sal_address or gateway.net.source_for(r.routers[0][0])[0]
            self.registrar = Registrar(reg.Signer(r.key, r.sender), aton(address), r.routers,
                                       r.refresh_interval, r.hold_time)
            for svc in cfg.services:
                self.registrar.offer(svc.key, reg.Record(
                    svc.name, ServicePrefix(svc.service_id), svc.weight, svc.priority))
            self.checks = {}
            for backend, keys in self.by_backend.items():
                # services sharing a backend share its check: the first one's settings
                h = r.health.for_service(keys[0].rsplit(":", 1)[0])
                protocol = "udp" if len(backend) == 3 else "tcp"
                kind = kind_for(h.kind, protocol, [backend[1], *(ports[k] for k in keys)])
                check = self.checks[backend] = HealthCheck(h.interval, h.rise, h.fall, kind,
                                                           h.eject_time, h.timeout)
                if check.up:                  # passive only: offered from the start
                    for key in keys:
                        self.registrar.offers[key].healthy = True
        self._established: set[int] = set()       # live flows whose backend answered
        self._failed: set[int] = set()            # flows counted as failed, until forgotten
        self._next_address_check = 0.0

    def stop(self) -> None:
        if self.udp is not None and self.registrar is not None:
            self._send(self.registrar.stop(self.gw.clock(), self.gw.adapters.wall_ns()))
            log.info("unregistered from %d router(s)", len(self.registrar.routers))
        super().stop()

    def tick(self, now: float, wall_ns: int) -> None:
        self._send(self.registrar.tick(now, wall_ns))
        if self.gw.cfg.sal_address is None and now >= self._next_address_check:
            self._next_address_check = now + ADDRESS_CHECK
            self._follow_address(now, wall_ns)
        for backend, check in self.checks.items():
            if check.tick(now):
                self._health_changed(backend, True, "")
            if check.due(now):
                check.started(now)
                done = lambda ok, err, b=backend: self._checked(b, ok, err)     # noqa: E731
                if check.kind == "dns":
                    _DnsCheck.start(self.gw.reactor, backend[0], backend[1], check.timeout, done)
                else:
                    self.gw.reactor.connectTCP(backend[0], backend[1], _CheckFactory(done), timeout=check.timeout)

    def flow_events(self, events) -> None:
        """The translator's flow events (after each batch): a real handshake with a
        backend is a passive health check. Established: the backend answered. Closing
        before that: it refused (RST to the SYN) or never answered (the handshake timed
        out). (A client giving up mid-handshake counts too: ``fall`` absorbs one.)"""
        if not self.checks:
            return
        for ev in events:
            flow = ev.flow
            fid = flow.sal.local_flow
            if flow.udp is not None:
                # a UDP flow's handshake is ours alone: only the backend's datagrams (or
                # its port unreachable) say anything about it
                if isinstance(ev, UdpAnswered):
                    self._passive(_backend_of(flow), True, "")
                elif isinstance(ev, UdpRefused):
                    self._passive(_backend_of(flow), False, "refused a datagram (port unreachable)")
                continue
            if isinstance(ev, FlowEstablished):
                self._established.add(fid)
                if ev.rtt is not None:                   # (not a flow resumed from a snapshot)
                    self._passive(_backend_of(flow), True, "")
            elif isinstance(ev, (FlowClosing, FlowClosed)):
                if fid not in self._established and fid not in self._failed:
                    self._failed.add(fid)
                    refused = flow.sal.state is not None and flow.sal.state.value == "reset"
                    self._passive(_backend_of(flow), False,
                                  "refused a connection" if refused else "a handshake timed out")
                if isinstance(ev, FlowClosed):
                    self._established.discard(fid)
                    self._failed.discard(fid)

    def _follow_address(self, now: float, wall_ns: int) -> None:
        """Without a configured sal_address we register the address that reaches the
        routers; when that changes (the host moved), register the new one at once."""
        try:
            address = aton(self.gw.net.source_for(self.routing.routers[0][0])[0])
        except (LookupError, OSError):
            return
        if address != self.registrar.address:
            log.info("our address is now %s: registering from it", ntoa(address))
            self._send(self.registrar.set_address(address, now, wall_ns))

    def _passive(self, backend, ok: bool, error: str) -> None:
        check = self.checks.get(backend) if backend is not None else None
        if check is not None:
            changed = check.passive(ok, self.gw.clock(), error)
            if changed is not None and self.udp is not None:
                self._health_changed(backend, changed, error)

    def _checked(self, backend: tuple, ok: bool, error: str) -> None:
        changed = self.checks[backend].result(ok, error)
        if changed is None or self.udp is None:      # (a check that ends after stop)
            return
        self._health_changed(backend, ok, error)

    def _health_changed(self, backend: tuple, ok: bool, error: str) -> None:
        log.log(logging.INFO if ok else logging.WARNING, "backend %s:%d is %s%s", *backend[:2],
                "up" if ok else "down", "" if ok else f" ({error})")
        now, wall = self.gw.clock(), self.gw.adapters.wall_ns()
        for key in self.by_backend[backend]:
            self._send(self.registrar.set_health(key, ok, now, wall))
            self.table.set_health(key, ok)

    def _on_reply(self, data: bytes, addr) -> None:
        self.registrar.on_reply(data, tuple(addr), self.gw.clock())

    # --- control commands -------------------------------------------------------------
    def commands(self) -> dict:
        return {"services": self.services, "drain": self.drain}

    def drain(self, service: str, cancel: bool = False):
        services = self.table.services()
        keys = [k for k in services if service in (k, k.rsplit(":", 1)[0])]
        if not keys:
            raise ValueError(f"no service {service!r} (have {', '.join(services)})")
        now, wall = self.gw.clock(), self.gw.adapters.wall_ns()
        for key in keys:
            if self.registrar is not None:
                self._send(self.registrar.set_drained(key, not cancel, now, wall))
            self.table.set_drained(key, not cancel)
            log.info("service %s %s", key, "resumed" if cancel else "draining: no new connections")
        return [row for row in self.services() if row["service"] in keys]

    def services(self):
        now = self.gw.clock()
        flows = self.gw.translator.live_flows_by_backend()
        rows = []
        for key, rule in self.table.services().items():
            backend = rule.target
            offer = self.registrar.offers.get(key) if self.registrar else None
            check = self.checks.get(_backend_key(backend)) if self.checks else None
            rows.append({
                "service": key, "service_id": short(rule.prefix.value.to_bytes(32, "big")),
                "backend": str(backend), "weight": rule.weight, "priority": rule.priority,
                "health": check.state if check else "unchecked",
                "state": offer.state if offer else ("draining" if key in self.table.drained else "serving"),
                "routers_acked": f"{self.registrar.routers_acked(now)}/{len(self.registrar.routers)}"
                if self.registrar else "-",
                "flows": flows.get((backend.address, backend.port), 0)})
        return rows


class ClientAgent(_Agent):
    def __init__(self, gateway):
        super().__init__(gateway)
        self.health = None
        if self.routing is not None:
            r = self.routing
            self.health = RouterHealth(reg.Signer(r.key, r.sender), r.routers, r.probe_interval,
                                       r.probe_misses, gateway.clock())

    def tick(self, now: float, wall_ns: int) -> None:
        self._send(self.health.tick(now, wall_ns))
        removed, added = self.gw.table.set_live_routers(self.health.live(now))
        if removed or added:
            log.warning("routers down: %s; up: %s; default rule now %s", removed or "-", added or "-",
                        ", ".join(self.gw.table.routers_in_rule()))
        if removed:
            moved = self.gw.translator.redirect_pending({aton(a) for a in removed}, now)
            self.gw.stats["syns_redirected"] += moved
            self.gw._flush()

    def _on_reply(self, data: bytes, addr) -> None:
        self.health.on_reply(data, tuple(addr), self.gw.clock())

    def commands(self) -> dict:
        return {"services": self.services, "drain": self.drain}

    def drain(self, service: str, cancel: bool = False):
        raise ValueError("drain is for a server gateway (a client gateway serves nothing)")

    def services(self):
        """The client's table: each rule's targets, and for routers their health."""
        now = self.gw.clock()
        health = {row["router"].split(":")[0]: row for row in self.health.rows(now)} if self.health else {}
        rows = []
        for entry in self.gw.translator.table.entries():
            for t in entry.targets:
                h = health.get(t.target, {})
                rows.append({"prefix": "default" if entry.prefix.bits == 0 else f"{short(entry.prefix.value.to_bytes(32, 'big'))}:{entry.prefix.bits}",
                             "action": t.action.value, "next_hop": t.target, "weight": t.weight,
                             "priority": t.priority, "health": h.get("state", "unchecked"),
                             "rtt_ms": h.get("rtt_ms"), "conns": t.hits})
        in_rule = {t for e in self.gw.translator.table.entries() for t in (x.target for x in e.targets)}
        for address, row in health.items():       # routers taken out of the rule
            if address not in in_rule:
                rows.append({"prefix": "default", "action": "forward", "next_hop": address, "weight": 1,
                             "priority": 1, "health": row["state"], "rtt_ms": row["rtt_ms"], "conns": 0})
        return rows


class _Check(Protocol):
    def connectionMade(self):
        self.factory.report(True, "")
        self.transport.loseConnection()


class _CheckFactory(ClientFactory):
    """One TCP connect to a backend; reports once: connected, refused or timed out."""
    protocol = _Check

    def __init__(self, done):
        self.done = done

    def report(self, ok: bool, error: str) -> None:
        done, self.done = self.done, None
        if done is not None:
            done(ok, error)

    def clientConnectionFailed(self, connector, reason):
        self.report(False, reason.getErrorMessage())


class _DnsCheck(DatagramProtocol):
    """One DNS query to a backend from a connected UDP socket; reports once: answered,
    refused (port unreachable) or timed out."""

    @classmethod
    def start(cls, reactor, host: str, port: int, timeout: float, done) -> None:
        check = cls(done, reactor.callLater(timeout, lambda: check.report(False, "no answer to a DNS query")))
        check.port = reactor.listenUDP(0, check)
        try:
            check.port.connect(host, port)
            check.port.write(dns_probe(check.txid))
        except OSError as exc:
            check.report(False, str(exc))

    def __init__(self, done, timer):
        self.done, self.timer, self.port = done, timer, None
        self.txid = secrets.randbelow(0x10000)

    def datagramReceived(self, data, addr):
        if dns_answered(data, self.txid):
            self.report(True, "")

    def connectionRefused(self):
        self.report(False, "refused a DNS query (port unreachable)")

    def report(self, ok: bool, error: str) -> None:
        done, self.done = self.done, None
        if done is None:
            return
        if self.timer.active():
            self.timer.cancel()
        if self.port is not None:
            self.port.stopListening()
        done(ok, error)


def _backend_key(backend) -> tuple:
    """What a backend's check is known by: (host, port), and (host, port, "udp") for a
    UDP one (a TCP and a UDP server may share host:port, iperf3's, and fail apart)."""
    key = (ntoa(backend.address), backend.port)
    return key + ("udp",) if backend.protocol == 17 else key


def _backend_of(flow):
    """The check key of a server flow's backend, or None."""
    backend = flow.extra[0] if flow.extra else None
    return _backend_key(backend) if backend is not None else None
