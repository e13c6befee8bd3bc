"""A router process: the core wired to NFQUEUE (SAL SYNs addressed to us), a UDP port
(registrations and probes), a raw socket (SYNs released by DELAY), the control socket
and a timer; the gateway's adapters are reused as they are."""
import logging
import os
import time

from twisted.internet.protocol import DatagramProtocol

from gateway.daemon import kernel_queue_stats

from .config import RouterConfig
from .core import PASS, RouterCore

log = logging.getLogger("serval.router")
MARK = 0x5E7A2


def interception_plan(cfg: RouterConfig, interfaces: list[str]) -> dict:
    """Queue SAL SYNs (IP protocol 144, and the UDP carriage) addressed to the router;
    forward what the core rewrites (ip_forward) back out of the interface it came in on,
    without telling the client to go elsewhere (send_redirects) and whatever the
    reverse path of the client's address (rp_filter)."""
    to_us = ["-d", cfg.address] if cfg.address else ["-m", "addrtype", "--dst-type", "LOCAL"]
    pre = [["-p", "144", *to_us], ["-p", "udp", "--dport", str(cfg.sal_udp_port), *to_us]]
    sysctls = {"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.rp_filter": "0",
               "net.ipv4.conf.all.send_redirects": "0"}
    for name in interfaces:
        dev = name.replace(".", "/")
        sysctls[f"net.ipv4.conf.{dev}.rp_filter"] = "0"
        sysctls[f"net.ipv4.conf.{dev}.send_redirects"] = "0"
    return {"prerouting": pre, "output": [], "sysctls": sysctls, "routes": []}


class Router:
    def __init__(self, cfg: RouterConfig, reactor):
        self.cfg = cfg
        self.reactor = reactor
        self.core = RouterCore(cfg.instance, cfg.keys, cfg.options, time.monotonic())
        for rule in cfg.rules:
            self.core.add_rule(rule.prefix, rule.action, rule.next_hop, rule.priority, rule.weight, rule.name)
        for prefix, affinity, _ in cfg.affinities:
            self.core.set_affinity(prefix, affinity)
        self.interception = self.reader = self.injector = self.udp = self.port = self.ticker = None
        self.names_port = None       # the names view the resolver polls (cfg.names_view)
        self.observer = None         # metrics listener, log lines derived from counters (serval/observe.py)

    def start(self) -> None:
        from twisted.internet.task import LoopingCall
        from gateway.adapters import control, netlink
        from gateway.adapters.inject import Injector
        from gateway.adapters.nfqueue import QueueReader
        from nat import Interception
        from serval.observe import RouterObserver

        cfg = self.cfg
        self.interception = Interception(cfg.instance, cfg.queue, cfg.state_dir, bypass=cfg.queue_bypass, mark=MARK)
        self.interception.install(**interception_plan(cfg, netlink.ipv4_interfaces()))
        try:
            self.injector = Injector(MARK, self.core.stats)
            self.reader = QueueReader(cfg.queue, self._handle, self._flush, self.core.stats)
            self.reactor.addReader(self.reader)
            self.udp = self.reactor.listenUDP(cfg.registration_port, _ControlPlane(self), interface=cfg.address or "")
            self.port = control.listen(self.reactor, cfg.control_socket, self.commands())
            if cfg.names_view:
                host, port = cfg.names_view
                self.names_port = self.reactor.listenTCP(
                    port, control.ControlFactory({"live_names": self._live_names}), interface=host)
            self.ticker = LoopingCall(self._tick)
            self.ticker.start(0.01, now=False)
            self.observer = RouterObserver(self)
            self.observer.start()
        except BaseException:
            self.stop()
            raise
        log.info("router %s up: SYNs to %s (queue %d), registrations on udp/%d, %d key(s), %d rule(s)",
                 cfg.instance, cfg.address or "any local address", cfg.queue, cfg.registration_port,
                 len(cfg.keys), len(cfg.rules))

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer = None
        if self.ticker is not None and self.ticker.running:
            self.ticker.stop()
        for attr, close in (("reader", lambda r: (self.reactor.removeReader(r), r.close())),
                            ("udp", lambda p: p.stopListening()), ("port", self._close_control),
                            ("names_port", lambda p: p.stopListening()),
                            ("injector", lambda i: i.close()), ("interception", lambda i: i.remove())):
            thing = getattr(self, attr)
            if thing is not None:
                close(thing)
                setattr(self, attr, None)

    def _close_control(self, port) -> None:
        port.stopListening()
        try:       # no stale socket after a clean stop (Twisted unlinks it only later)
            os.unlink(self.cfg.control_socket)
        except FileNotFoundError:
            pass

    # --- packets, datagrams, time --------------------------------------------------
    def _handle(self, payload: bytes):
        from gateway.translate import PASS as ACCEPT
        verdict = self.core.on_packet(payload, time.monotonic())
        return ACCEPT if verdict is PASS else verdict

    def _flush(self) -> None:
        for packet in self.core.outbox:
            self.injector.send(packet)
        self.core.outbox.clear()

    def _tick(self) -> None:
        # refreshes already in the socket first: after a stall of our own (a burst of
        # SYNs), a registration must not expire whose refresh merely waits here
        self.udp.doRead()
        now = time.monotonic()
        deadline = self.core.next_deadline()
        if deadline is not None and deadline <= now:
            self.core.handle_timer(now)
        self._flush()

    # --- control socket --------------------------------------------------------------
    def commands(self) -> dict:
        return {"services": lambda: self.core.services(time.monotonic()),
                "names": self.core.names, "stats": self._stats, "config": self._config}

    def _live_names(self):
        """The resolver's view (dns_resolver/router_names.py): the names with their
        instances, and whether this router has been up long enough to know them."""
        now = time.monotonic()
        return {"ready": now - self.core.started >= self.core.options.warmup, "names": self.core.names()}

    def _stats(self):
        stats = dict(self.core.stats)
        stats.update(self.core.service_counters())
        stats["registrations_live"] = len(self.core.registry.by_sender)
        stats["syns_held"] = len(self.core.held)
        stats.update({f"registry_{k}": v for k, v in self.core.registry.stats.items()})
        stats.update(kernel_queue_stats(self.cfg.queue))
        return stats

    def _config(self):
        cfg = self.cfg
        return {"role": "router", "path": cfg.path, "instance": cfg.instance, "address": cfg.address,
                "queue": cfg.queue, "registration_port": cfg.registration_port,
                "keys": [{"id": k.key_id, "names": list(k.names)} for k in cfg.keys],
                "rules": [{"prefix": str(r.prefix), "action": r.action.value, "next_hop": r.next_hop}
                          for r in cfg.rules],
                "services": [{"service": label or str(prefix), "affinity": "client" if a else "none",
                              "affinity_timeout": a.timeout if a else None} for prefix, a, label in cfg.affinities],
                "icmp": {"rate": cfg.options.icmp_rate, "burst": cfg.options.icmp_burst}}


class _ControlPlane(DatagramProtocol):
    """Registrations and probes: each datagram to the core, its reply (if any) back."""

    def __init__(self, router: Router):
        self.router = router

    def datagramReceived(self, data, addr):
        try:
            reply = self.router.core.on_control(data, time.monotonic(), time.time_ns())
            if reply is not None:
                self.transport.write(reply, addr)
        except Exception:     # one bad datagram must never stop the router
            self.router.core.stats["internal_errors"] += 1
            log.exception("control datagram from %s", addr)


def describe(cfg: RouterConfig) -> str:
    return (f"{cfg.path}: ok (router {cfg.instance}, address {cfg.address or 'any'}, "
            f"{len(cfg.keys)} key(s), {len(cfg.rules)} rule(s))")

