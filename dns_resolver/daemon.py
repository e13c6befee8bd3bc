"""A resolver process: config → names, allocator, zones, cache, core, forwarder,
listeners and timers, wired to the Twisted reactor; and a clean stop."""
from __future__ import annotations

import ipaddress
import logging
import time

from twisted.internet.task import LoopingCall

from serval.observe import DnsObserver

from . import gateway_link
from .allocator import Allocator
from .cache import Cache
from .config import DnsConfig, resolv_conf_servers
from .core import Forward, Reply, Resolver
from .liveness import Liveness
from .names import StaticNames
from .policy import Acl, RateLimiter
from .router_names import RouterPoller
from .server import MAX_UDP_QUERY, TCPConnection, TCPServer, UDPServer
from .store import MappingsFile, MemoryStore
from .upstream import Forwarder
from .zone import ServiceZone

log = logging.getLogger("serval.dns")

URGENT_SWEEP_GAP = 2.0       # seconds between reclaim sweeps forced by a full range


def debug_enabled() -> bool:
    return log.isEnabledFor(logging.DEBUG)


def describe(data: bytes) -> str:
    """One line about a DNS message, for debug logs."""
    try:
        from dnslib import QTYPE, RCODE, DNSRecord
        msg = DNSRecord.parse(data)
        q = msg.q
        what = f"{q.qname} {QTYPE.get(q.qtype, q.qtype)}" if msg.questions else "(no question)"
        if not msg.header.qr:
            return f"id {msg.header.id} {what}"
        answers = ", ".join(str(rr.rdata) for rr in msg.rr[:4]) + (" ..." if len(msg.rr) > 4 else "")
        flags = " TC" if msg.header.tc else ""
        return f"id {msg.header.id} {what} {RCODE.get(msg.header.rcode, msg.header.rcode)}{flags} [{answers}]"
    except Exception as exc:
        return f"{len(data)} bytes, unparsable ({exc})"


def _key(name: str) -> tuple:
    return tuple(label.encode("ascii") for label in name.split("."))


def upstream_servers(cfg: DnsConfig) -> tuple[list, str]:
    """The upstreams and where they came from; never one of our own listen sockets."""
    own = set(cfg.listen)
    for host, port in cfg.listen:
        if ipaddress.ip_address(host).is_unspecified:     # 0.0.0.0 / :: covers loopback too
            own |= {("127.0.0.1", port), ("::1", port), ("127.0.0.53", port)}
    if cfg.upstreams_configured:
        return [u for u in cfg.upstreams if u not in own], "config"
    return resolv_conf_servers(cfg.resolv_conf, own), cfg.resolv_conf


class DnsDaemon:
    def __init__(self, cfg: DnsConfig, reactor):
        self.cfg = cfg
        self.reactor = reactor
        self.ports = []
        self.tcp_factories = []
        self.timers = []
        self.sweeping = False
        self.last_urgent = 0.0
        self.started = time.monotonic()
        self.warned_no_gateway = False
        self.gateway_ok = True
        self.observer = None         # metrics listener, log lines derived from counters (serval/observe.py)

        cfg = self.cfg
        self.stats: dict = {}        # the counters of the core, the zones and the liveness view
        self.store = MappingsFile(cfg.mappings) if cfg.mappings else MemoryStore()
        self.names = StaticNames(cfg.services)
        pinned = {s.name: s.address for s in cfg.services if s.address}
        self.allocator = Allocator(cfg.virtual_network, cfg.exclude, self.store, pinned,
                                   {s.name: s.udp_ports for s in cfg.services})
        self.liveness = self.poller = None
        if cfg.liveness_routers:
            self.liveness = Liveness(cfg.liveness_routers, cfg.liveness_stale_after, self.stats)
            self.poller = RouterPoller(reactor, self.liveness, cfg.liveness_interval, cfg.liveness_timeout,
                                       self._liveness_changed)
        self.zones = [ServiceZone(z.name, self.names, self.allocator, z.ttl, z.negative_ttl,
                                  liveness=self.liveness if z.routed else None, down_ttl=cfg.down_ttl,
                                  stats=self.stats) for z in cfg.zones]
        self.zones.sort(key=lambda z: -len(z.key))          # most specific zone first
        self.max_zone_ttl = max((z.ttl for z in cfg.zones), default=0)
        self.upstreams, self.upstreams_from = upstream_servers(cfg)
        self.cache = Cache(cfg.cache_size, cfg.min_ttl, cfg.max_ttl, cfg.max_negative_ttl)
        self.core = Resolver(self.zones, self.cache, Acl(cfg.allow),
                             RateLimiter(cfg.rate, cfg.burst, cfg.rate_clients),
                             forwarding=bool(self.upstreams), max_udp=cfg.max_udp_size,
                             upstream_udp=cfg.upstream_udp_size, slip=cfg.slip, stats=self.stats)
        self.forwarder = Forwarder(reactor, self.upstreams, cfg.timeout, cfg.retry_down_after)

    # --- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        cfg = self.cfg
        kept = self.allocator.load(time.time())
        try:
            for host, port in cfg.listen:
                udp = UDPServer(self)
                # one byte more than any query we take: a longer datagram arrives cut, and is dropped
                self.ports.append(self.reactor.listenUDP(port, udp, interface=host,
                                                         maxPacketSize=MAX_UDP_QUERY + 1))
                factory = TCPServer(self)
                self.tcp_factories.append(factory)
                self.ports.append(self.reactor.listenTCP(port, factory, backlog=128, interface=host))
            self.observer = DnsObserver(self)
            self.observer.start()
        except BaseException:
            self.stop()
            raise
        for interval, fn in ((cfg.flush_interval, self._flush), (cfg.reclaim_interval, self.sweep),
                             (1.0, self._urgent_sweep)):
            call = LoopingCall(fn)
            call.clock = self.reactor
            call.start(interval, now=False)
            self.timers.append(call)
        self._log_started(kept)
        if self.poller is not None:
            self.poller.start()

    def stop(self) -> None:
        """Stop listening, drop upstream work, save answer times; safe to call twice."""
        if self.observer is not None:
            self.observer.stop()
            self.observer = None
        for call in self.timers:
            if call.running:
                call.stop()
        self.timers.clear()
        if self.poller is not None:
            self.poller.stop()
        for port in self.ports:
            port.stopListening()
        self.ports.clear()
        for factory in self.tcp_factories:
            factory.close_all()
        self.tcp_factories.clear()
        self.forwarder.close()
        self._flush()
        log.info("stopped: %s", self.summary())

    # --- messages ------------------------------------------------------------------
    def received(self, data: bytes, client: str, tcp: bool, to) -> None:
        if debug_enabled():
            log.debug("query from %s over %s: %s", client, "TCP" if tcp else "UDP", describe(data))
        try:
            actions = self.core.handle(data, client, tcp, time.monotonic(), time.time(), to)
        except Exception:       # a message must never take the server down
            log.exception("internal error handling a message from %s", client)
            self.core.stats["internal_errors"] = self.core.stats.get("internal_errors", 0) + 1
            return
        self.perform(actions)

    def perform(self, actions) -> None:
        for action in actions:
            if isinstance(action, Reply):
                to = action.to
                if debug_enabled():
                    log.debug("reply to %s: %s", to.peer if isinstance(to, TCPConnection) else to[1][0],
                              describe(action.data))
                try:
                    if isinstance(to, TCPConnection):
                        to.send(action.data)
                    else:
                        transport, addr = to
                        transport.write(action.data, addr)
                except Exception as exc:       # a closed socket, a full buffer: the client retries
                    log.debug("cannot send a reply: %s", exc)
            elif isinstance(action, Forward):
                d = self.forwarder.query(action.data)
                d.addCallback(self._upstream_done, action.key)
                d.addErrback(self._upstream_error, action.key)

    def _upstream_done(self, response, key) -> None:
        self.perform(self.core.upstream_done(key, response, time.monotonic()))

    def _upstream_error(self, failure, key) -> None:
        log.error("forwarding failed: %s", failure.getErrorMessage())
        self.perform(self.core.upstream_done(key, None, time.monotonic()))

    # --- housekeeping --------------------------------------------------------------
    def _flush(self) -> None:
        try:
            self.allocator.flush()
        except OSError as exc:
            log.error("cannot write mappings file %s: %s", self.cfg.mappings, exc)

    def _urgent_sweep(self) -> None:
        if self.allocator.exhausted and time.monotonic() - self.last_urgent > URGENT_SWEEP_GAP:
            self.last_urgent = time.monotonic()
            self.sweep(threshold=self.max_zone_ttl)

    def sweep(self, threshold: float | None = None):
        """Reclaim addresses idle for longer than ``threshold`` (default
        ``reclaim_after``) that no live flow uses. Returns a Deferred (or None when
        there was nothing to do)."""
        if self.sweeping:
            return None
        threshold = self.cfg.reclaim_after if threshold is None else max(threshold, self.max_zone_ttl)
        candidates = self.allocator.idle(time.time(), threshold)
        if not candidates:
            return None
        if not self.cfg.gateway_control:
            if not self.warned_no_gateway:
                log.warning("%d address(es) idle, but no gateway_control socket is configured: "
                            "reclaiming nothing", len(candidates))
                self.warned_no_gateway = True
            return None
        self.sweeping = True
        d = gateway_link.virtual_in_use(self.reactor, self.cfg.gateway_control)

        def reclaim(in_use):
            if not self.gateway_ok:
                log.info("the gateway at %s answers again", self.cfg.gateway_control)
                self.gateway_ok = True
            self.allocator.reclaim(candidates, in_use, time.time(), threshold)

        def unreachable(failure):
            level = logging.WARNING if self.gateway_ok else logging.DEBUG
            log.log(level, "cannot ask the gateway at %s which addresses are in use (%s): reclaiming nothing "
                    "(%d idle)", self.cfg.gateway_control, failure.getErrorMessage(), len(candidates))
            self.gateway_ok = False

        def done(_):
            self.sweeping = False

        return d.addCallbacks(reclaim, unreachable).addBoth(done)

    def _liveness_changed(self, before, after) -> None:
        """One line when the routers' view becomes known or unknown, one per routed
        name that loses its last instance or gets one back."""
        routed = [z for z in self.zones if z.liveness is not None]
        names = sorted(n for n in self.names.names() if any(z.contains(_key(n)) for z in routed))
        if after is None:
            log.warning("no ready router heard from within %g s: answering every name as configured "
                        "(whether it has a live instance is unknown)", self.liveness.stale_after)
            return
        was_down = {n for n in names if before is not None and n not in before}
        now_down = {n for n in names if n not in after}
        if before is None:
            log.info("routers' names view: %d of %d routed name(s) with a live instance%s", len(names) - len(now_down),
                     len(names), f"; none for {', '.join(sorted(now_down))}" if now_down else "")
        for name in sorted(now_down - was_down) if before is not None else ():
            log.info("%s: no live instance at the routers: answering NODATA (ttl %d s)", name, self.cfg.down_ttl)
        for name in sorted(was_down - now_down):
            log.info("%s: a live instance again", name)

    # --- logs ----------------------------------------------------------------------
    def _log_started(self, kept: int) -> None:
        cfg = self.cfg
        listen = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in cfg.listen)
        log.info("dns resolver up: listening on %s (UDP and TCP), clients from %s", listen, ", ".join(cfg.allow))
        for zone in cfg.zones:
            log.info("zone %s: %d service(s), ttl %d s, negative ttl %d s", zone.name, len(zone.services),
                     zone.ttl, zone.negative_ttl)
        where = cfg.mappings or "memory only (no mappings file: a gateway cannot learn them)"
        log.info("virtual range %s, %d mapping(s) loaded from %s", cfg.virtual_network, kept, where)
        if self.upstreams:
            log.info("forwarding other names to %s (from %s), timeout %g s",
                     ", ".join(str(u) for u in self.forwarder.upstreams), self.upstreams_from, cfg.timeout)
        else:
            log.warning("no upstream resolvers (from %s): names outside the service zones get SERVFAIL",
                        self.upstreams_from)
        if cfg.rate > 0:
            over = ("queries over it dropped" if not cfg.slip else
                    "queries over it answered TC (the client asks again over TCP)" if cfg.slip == 1 else
                    f"1 in {cfg.slip} queries over it answered TC (the client asks again over TCP), the rest dropped")
            log.info("rate limit %g queries/s per client over UDP (burst %g), %s", cfg.rate, cfg.burst, over)
        if cfg.gateway_control:
            log.info("asking the gateway at %s before reclaiming an address", cfg.gateway_control)
        if cfg.liveness_routers:
            zones = [z.name for z in cfg.zones if z.routed]
            log.info("asking router(s) %s every %g s which names have a live instance (zones %s; "
                     "none: NODATA, ttl %d s)", ", ".join(f"{h}:{p}" for h, p in cfg.liveness_routers),
                     cfg.liveness_interval, ", ".join(zones) or "none", cfg.down_ttl)

    def summary(self) -> str:
        s = self.core.stats
        keys = ("queries", "zone_answers", "cache_answers", "upstream_answers", "servfail", "formerr",
                "refused", "rate_limited", "rate_limited_truncated", "dropped", "truncated")
        return ", ".join(f"{k}={s.get(k, 0)}" for k in keys) + \
            f", mappings={len(self.allocator.by_name)}, cached={len(self.cache)}"
