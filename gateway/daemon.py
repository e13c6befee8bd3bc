"""A gateway process: config → translator, interception rules, queue reader, injector,
control socket and timers, wired to the Twisted reactor; and undone again on stop."""
import logging
import os

from sal.ip import aton
from sal.serviceid import ServicePrefix, short
from sal.service_table import Action, ServiceTable

from .adapters import Adapters
from .adapters.nfqueue import SYN_QUEUE_LEN
from .config import GatewayConfig
from .translate import PASS, Backend, ClientTranslator, ServerTranslator
from .translate.carriage import make_carriage
from .lifecycle import SNAPSHOT_EVERY, LifecycleMixin
from .paths import FlowPath, Route, plan_moves
from .reachability import NoRoute, roles, unreachable_at_start
from .table_owner import TableOwner, config_rules
from .virtual_map import VirtualMap

log = logging.getLogger("serval.gateway")
MARK = 0x5E7A1


def path_mtu(cfg: GatewayConfig, link_mtus: dict[str, int]) -> int:
    """The MTU translated packets are sized for (the MSS clamp follows it): with
    ``mtu = "auto"`` the smallest MTU of this host's links (a PPPoE uplink's 1492, a
    tunnel's), lowered later per peer by what ICMP teaches. A configured ``mtu`` no
    link here can carry is refused: every large packet would be lost."""
    if cfg.mtu == "auto":
        return min(link_mtus.values(), default=1500)
    if link_mtus and cfg.mtu > max(link_mtus.values()):
        from .config import ConfigError, line_of
        links = ", ".join(f"{name} {mtu}" for name, mtu in sorted(link_mtus.items()))
        raise ConfigError(cfg.path, line_of(cfg.path, "gateway", "mtu"),
                          f"mtu = {cfg.mtu} is larger than every link here ({links}): "
                          f"use mtu = \"auto\" or at most {max(link_mtus.values())}")
    return cfg.mtu


def build_translator(cfg: GatewayConfig, source_for, link_mtus: dict[str, int]):
    """The translator for ``cfg``; ``source_for(address) -> (our address, interface)``,
    ``link_mtus`` the MTU of each of this host's links."""
    carriage = make_carriage(cfg.carriage, cfg.role)
    common = dict(mtu=path_mtu(cfg, link_mtus), timeouts=cfg.timeouts, limits=cfg.limits)
    table = ServiceTable()
    if cfg.role == "client":
        for rule in cfg.rules:
            table.add(rule.prefix, rule.action, rule.next_hop, rule.priority, rule.weight)
        first_hop = next((r.next_hop for r in cfg.rules if r.next_hop), None)
        sal_address = cfg.sal_address or source_for(first_hop)[0]
        tcp, udp = virtual_services(cfg)
        virtual = VirtualMap(tcp, cfg.mappings, fixed_udp=udp)
        return ClientTranslator(aton(sal_address), virtual, table, carriage,
                                virtual_network=cfg.virtual_network, resolve_udp=virtual.udp, **common)
    for svc in cfg.services:
        host, port = svc.backend
        backend = Backend(aton(host), port, aton(source_for(host)[0]), svc.name,
                          17 if svc.protocol == "udp" else 6, svc.helper)
        table.add(ServicePrefix(svc.service_id), Action.DEMUX, backend, svc.priority, svc.weight)
    _check_ephemeral_overlap(cfg)
    return ServerTranslator(table, carriage, port_range=cfg.port_range,
                            keep_client_address=cfg.client_address == "peer",
                            sources=[aton(a) for a in cfg.source_addresses],
                            backend_time_wait=cfg.backend_time_wait,
                            accept_broadcast_syn=cfg.accept_broadcast_syn, **common)


def virtual_services(cfg: GatewayConfig) -> tuple[dict, dict]:
    """(address, port) -> serviceID of the client config's TCP services, and of its UDP ones."""
    by = {"tcp": {}, "udp": {}}
    for s in cfg.services:
        by[s.protocol][(aton(s.address), s.port)] = s.service_id
    return by["tcp"], by["udp"]


def _check_ephemeral_overlap(cfg: GatewayConfig) -> None:
    """This host's own connections (health checks; the backend's, in a sidecar) take
    their ports from the ephemeral range: the pool toward backends must stay out of it."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
    except (OSError, ValueError):
        return
    if cfg.port_range[0] <= high and low <= cfg.port_range[1]:
        log.warning("port_range %d-%d overlaps this host's ephemeral ports %d-%d "
                    "(net.ipv4.ip_local_port_range): a local connection to a backend may take a "
                    "port a translated one holds; make them disjoint", *cfg.port_range, low, high)


def interception_plan(cfg: GatewayConfig, translator, interfaces: list[str], need_route,
                      local_in_kernel: bool = False) -> dict:
    """The rules, sysctls and routes a gateway installs (keyword arguments for
    ``nat.Interception.install``).

    Three queues: new connections' SYNs (legacy, and SAL SYNs, which name no flow of
    ours yet) go to the new-flow queue, short and read in batches; the rest of SAL
    control (extensions) and the backends' SYN-ACKs go to ``cfg.control_queue``, read
    first and whole; the bulk goes to ``cfg.queue``, read in batches. So a handshake or a
    move never waits behind thousands of data packets, nor behind a SYN flood.

    ``local_in_kernel``: this host's own TCP and UDP toward the virtual range are routed
    through loopback, whose ingress the fast path translates (as for a sidecar's
    backend): they are not queued in OUTPUT, which would take them before the kernel
    could, but as they come in on lo, where the fast path has passed what it does not own."""
    from nat import ToQueue

    if cfg.carriage == "ip":
        sal_in, sal_hlen_at = ["-p", "144"], 8
    else:
        sal_in, sal_hlen_at = ["-p", "udp", "--dport", str(translator.carriage.local_port)], 16
    # the SAL header length byte is above 3 words when extensions follow
    sal_control = ToQueue(sal_in + ["-m", "u32", "--u32", f"0>>22&0x3C@{sal_hlen_at}>>24=4:255"],
                          cfg.control_queue)
    # a SAL SYN: destination flowID 0, and extensions
    sal_syn = ToQueue(sal_in + ["-m", "u32", "--u32", f"0>>22&0x3C@{sal_hlen_at - 4}=0&&"
                                f"0>>22&0x3C@{sal_hlen_at}>>24=4:255"], cfg.new_flow_queue)
    pre, out, routes = [], [], []
    # SAL to any address: addresses change under live flows, and a packet still sent to
    # the one we just lost is translated rather than lost (what is not ours passes)
    pre += [sal_syn, sal_control, sal_in]
    if cfg.role == "client":
        legacy = ["-p", "tcp", "-d", cfg.virtual_network]
        syn = ToQueue(legacy + ["--tcp-flags", "SYN", "SYN"], cfg.new_flow_queue)
        # UDP toward the virtual range: a UDP service's datagrams are carried (with the
        # bulk), any other's refused at once (ICMP port unreachable) rather than lost on
        # a route with no next hop
        datagrams = ToQueue(["-p", "udp", "-d", cfg.virtual_network], cfg.queue)
        if cfg.intercept_local and local_in_kernel:
            # first, and failing closed: while no daemon runs these would be forwarded
            # back into loopback by the virtual range's route until their TTL ran out
            pre += [ToQueue(["-i", "lo", *syn.match], syn.queue, bypass=False),
                    ToQueue(["-i", "lo", *legacy], cfg.queue, bypass=False),
                    ToQueue(["-i", "lo", *datagrams.match], cfg.queue, bypass=False)]
        elif cfg.intercept_local:
            out += [syn, legacy, datagrams]
        if cfg.intercept_forwarded:
            pre += [syn, legacy, datagrams]
        if cfg.intercept_local:
            route = need_route(cfg)
            if route:
                routes.append(route)
    else:
        low, high = cfg.port_range
        for svc in cfg.services:
            host, port = svc.backend
            if svc.protocol == "udp":
                # a UDP backend's replies to our ports toward it (failing closed, as below);
                # with a helper from any port of the host (TFTP answers from a new one)
                sport = [] if svc.helper else ["--sport", str(port)]
                pre.append(ToQueue(["-p", "udp", "-s", host, *sport, "--dport", f"{low}:{high}"],
                                   cfg.queue, bypass=False))
                continue
            match = ["-p", "tcp", "-s", host, "--sport", str(port), "--dport", f"{low}:{high}"]
            # fail closed: while no daemon runs (a crash, before the restart), the
            # backend's packets are dropped, not handed to this host's TCP, which would
            # answer them with a RST and end flows a restart would have resumed
            syn = ToQueue(match + ["--tcp-flags", "SYN", "SYN"], cfg.control_queue, bypass=False)
            data = ToQueue(match, cfg.queue, bypass=False)
            # a backend on this very host (a sidecar) replies over loopback: its packets
            # are queued here too, as they come in on lo (where the kernel fast path
            # also sees them first); OUTPUT, before lo, would take them from it
            pre += [syn, data]
    # ICMP errors, about translated packets or not (the translator passes what is not
    # about a flow of its own): from routers on the path, and from this host's own
    # stack (a forwarded packet too big for the next link, a backend that does not
    # answer ARP), which are locally generated
    icmp_errors = [ToQueue(["-p", "icmp", "--icmp-type", kind], cfg.control_queue)
                   for kind in ("destination-unreachable", "time-exceeded")]
    pre += icmp_errors
    out += icmp_errors
    # Rewritten packets carry one of our own addresses as source on input
    # (accept_local), may arrive where the reverse path differs (rp_filter), and are
    # forwarded on (ip_forward).
    sysctls = {"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.accept_local": "1",
               "net.ipv4.conf.all.rp_filter": "0"}
    for name in interfaces:
        sysctls[f"net.ipv4.conf.{name.replace('.', '/')}.rp_filter"] = "0"
    return {"prerouting": pre, "output": out, "sysctls": sysctls, "routes": routes}


def _ntoa(addr: bytes) -> str:
    import socket
    return socket.inet_ntoa(addr)


class Gateway(LifecycleMixin):
    """A gateway process. ``adapters`` (gateway/adapters) are what it talks to outside
    itself: the real ones by default; unit tests pass fakes, with Twisted's
    MemoryReactorClock as ``reactor``."""

    def __init__(self, cfg: GatewayConfig, reactor, adapters: Adapters | None = None):
        self.cfg = cfg
        self.reactor = reactor
        self.adapters = adapters = adapters or Adapters()
        self.net = adapters.net
        self.clock = adapters.clock
        self.translator = None
        self.table = None            # the one writer of the service table (gateway/table_owner.py)
        self.interception = None
        self.reader = self.control_reader = self.syn_reader = None
        self.injector = self.port = self.watcher = None
        self._timer = None           # one reactor call at the translator's next deadline
        self._timer_at = None
        self._path_check = None
        self._paths_seen = {}        # flowID -> (peer, interface) of the last look (gateway/paths.py)
        self.routing = None          # the control plane: routers, health, drain (gateway/routing.py)
        self.observer = None         # metrics listener, log lines derived from counters (serval/observe.py)
        self.started = self.clock()
        self.stats = None
        self.snapshotter = None
        self.fastpath = None         # established flows in the kernel (gateway/fastpath), or None
        self.local_in_kernel = False  # it takes this host's own connections (through lo)
        self.redirect_survey = None  # fast_path_redirect = "auto": the periodic look at host filters
        self._surveying = False

    # --- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        from twisted.internet.task import LoopingCall
        from serval.observe import GatewayObserver
        from .routing import routing_agent

        cfg, a, net = self.cfg, self.adapters, self.net
        if a.control.in_use(cfg.control_socket):
            # a second copy must not take the running one's rules and socket away
            raise RuntimeError(f"a gateway already answers on {cfg.control_socket} (instance "
                               f"{cfg.instance!r} is running): not starting, nothing changed")
        try:
            self.translator = build_translator(cfg, net.source_for, net.link_mtus())
            self.stats = self.translator.stats
            self.table = TableOwner(self.translator.table, config_rules(cfg, net.source_for))
            self.routing = routing_agent(self)
            # the fast path first: whether it takes this host's own traffic decides the rules
            self.fastpath = (a.fast_path or start_fast_path)(cfg, self.translator, net.ipv4_interfaces())
            self.local_in_kernel = cfg.role == "client" and cfg.intercept_local and \
                getattr(self.fastpath, "loopback", False)
            plan = interception_plan(cfg, self.translator, net.ipv4_interfaces(), self._virtual_route,
                                     self.local_in_kernel)
        except NoRoute as exc:      # said with the config line that names the address
            if self.fastpath is not None:
                self.fastpath.stop()
                self.fastpath = None
            raise unreachable_at_start(cfg, exc) from None
        self.interception = a.interception(cfg.instance, cfg.queue, cfg.state_dir,
                                           bypass=cfg.queue_bypass, mark=MARK)
        try:
            self.interception.install(**plan)
        except BaseException:
            if self.fastpath is not None:
                self.fastpath.stop()
                self.fastpath = None
            raise
        try:
            what = {address: role[0] for address, role in roles(cfg).items()}
            self.injector = a.injector(MARK, self.stats, describe=what.get)
            self.reader = a.queue_reader(cfg.queue, self._handle, self._flush, self.stats, batch=64)
            self.reactor.addReader(self.reader)
            self.control_reader = a.queue_reader(cfg.control_queue, self._handle, self._flush, self.stats)
            self.reactor.addReader(self.control_reader)
            self.syn_reader = a.queue_reader(cfg.new_flow_queue, self._handle, self._flush, self.stats,
                                             batch=64, max_len=SYN_QUEUE_LEN)
            self.reactor.addReader(self.syn_reader)
            self.port = a.control.listen(self.reactor, cfg.control_socket, self.commands())
            self.watcher = a.watcher(self._on_netlink)
            self.reactor.addReader(self.watcher)
            self.resume_snapshot()
            self._flush()                       # resumed flows go back into the kernel
            if self.fastpath is not None:
                swept = self.fastpath.sweep()
                if swept:
                    log.info("fast path: %d kernel flow(s) of the previous run had no snapshot: removed", swept)
            if self.fastpath is not None and cfg.fast_path_redirect == "auto":
                from .fastpath.host_filters import SURVEY_EVERY
                self.redirect_survey = LoopingCall(self.survey_host_filters)
                self.redirect_survey.clock = self.reactor
                self.redirect_survey.start(SURVEY_EVERY, now=False)
            self.snapshotter = LoopingCall(self.save_snapshot)
            self.snapshotter.clock = self.reactor
            self.snapshotter.start(SNAPSHOT_EVERY, now=False)
            self.routing.start()
            self.observer = GatewayObserver(self)
            self.observer.start()
        except BaseException:
            self.stop()
            raise
        self.translator.local_addresses = {aton(a) for a in net.address_interfaces()}
        if cfg.role == "server":     # a SAL SYN may come to one of our subnets' broadcast addresses
            self.translator.broadcast_addresses = net.broadcast_addresses()
        self._log_started(plan)

    def stop(self) -> None:
        """Undo everything start did; safe to call twice and after a partial start."""
        if self.routing is not None:     # first: unregister while we still serve
            self.routing.stop()
            self.routing = None
        if self.observer is not None:
            self.observer.stop()
            self.observer = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.redirect_survey is not None and self.redirect_survey.running:
            self.redirect_survey.stop()
        self.redirect_survey = None
        if self.snapshotter is not None and self.snapshotter.running:
            self.snapshotter.stop()
            self.save_snapshot(force=True)      # what is still live, for a quick restart
        if self.fastpath is not None:           # its flows are Python's again
            self.fastpath.stop()
            self.fastpath = None
        if self.watcher is not None:
            self.reactor.removeReader(self.watcher)
            self.watcher.close()
            self.watcher = None
        if self._path_check is not None and self._path_check.active():
            self._path_check.cancel()
        for reader in (self.reader, self.control_reader, self.syn_reader):
            if reader is not None:
                self.reactor.removeReader(reader)
                reader.close()
        self.reader = self.control_reader = self.syn_reader = None
        if self.port is not None:
            self.port.stopListening()
            self.port = None
            try:
                os.unlink(self.cfg.control_socket)      # no stale socket after a clean stop
            except OSError:
                pass
        if self.injector is not None:
            self.injector.close()
            self.injector = None
        if self.interception is not None:
            self.interception.remove()
            self.interception = None
            log.info("stopped: rules, routes and sysctls restored; %s", self._summary())

    # --- data path -----------------------------------------------------------------
    def _handle(self, payload: bytes):
        now = self.clock()
        t = self.translator
        if payload[9] == 6:
            if t.role == "client":
                out = t.from_legacy(payload, now)
                local = self.local_in_kernel
            else:
                out = t.from_backend(payload, now)
                local = True
            if local and isinstance(out, bytes) and payload[12:16] in t.local_addresses:
                # from this host (a backend in this namespace, the client gateway's own
                # processes): it came in on lo, from which the stack will not forward
                # it; sent anew, it is routed as our own
                t.outbox.append(out)
                return None
            return out
        if payload[9] == 1:
            return t.from_icmp(payload, now)
        if payload[9] == 17:
            if t.role == "client":
                if t.is_virtual(payload[16:20]):
                    out = t.from_legacy_udp(payload, now)
                    if self.local_in_kernel and isinstance(out, bytes) and payload[12:16] in t.local_addresses:
                        t.outbox.append(out)       # from this host, in on lo (as TCP's above)
                        return None
                    return out
            elif t.udp_flows:
                out = t.from_backend_udp(payload, now)
                if out is not PASS:
                    if isinstance(out, bytes) and payload[12:16] in t.local_addresses:
                        t.outbox.append(out)       # from a backend in this namespace (as TCP's)
                        return None
                    return out
        return t.from_sal(payload, now)

    def _flush(self) -> None:
        box = self.translator.outbox
        if box:
            for packet in box:
                self.injector.send(packet)
            box.clear()
        events = self.translator.events
        if events:
            if self.fastpath is not None:
                self.fastpath.handle(events)
            if self.observer is not None:
                self.observer.flow_events(events)
            if self.routing is not None:        # real handshakes are passive health checks
                self.routing.flow_events(events)
            events.clear()
        self._arm_timer()

    def _arm_timer(self) -> None:
        """One timer, at the translator's next deadline (retransmission, hold, expiry),
        moved whenever a batch of packets or a command changed it."""
        if self.reactor is None or self.translator is None:
            return
        deadline = self.translator.next_deadline()
        if deadline == self._timer_at and (deadline is None or (self._timer and self._timer.active())):
            return
        self._timer_at = deadline
        if deadline is None:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            return
        delay = max(0.0, deadline - self.clock())
        if self._timer is not None and self._timer.active():
            self._timer.reset(delay)
        else:
            self._timer = self.reactor.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._timer = self._timer_at = None
        now = self.clock()
        deadline = self.translator.next_deadline()
        if deadline is not None and deadline <= now:
            self.translator.handle_timer(now)
        self._flush()                           # and the timer for what comes next

    # --- mobility ------------------------------------------------------------------
    def _on_netlink(self, events) -> None:
        # a change comes as a burst of messages, read together: look right after it
        if self._path_check is None or not self._path_check.active():
            self._path_check = self.reactor.callLater(0.001, self.check_paths)

    def check_paths(self, peer_filter=None, force_address: bytes | None = None,
                    follow_routes: bool = False) -> int:
        """Look at the live flows' paths and make the moves gateway/paths.py decides
        (after a link, address or route event; or by hand: ``peer_filter`` picks the
        flows, ``force_address`` moves them there, ``follow_routes`` to wherever the
        routes say). Returns how many moved."""
        t, net = self.translator, self.net
        flows = [FlowPath(f.sal.local_flow, f.peer_addr, f.local_addr, f.prev_peer_addr is not None)
                 for f in t.flows.values()
                 if f.closed_at is None and (peer_filter is None or peer_filter(f))]
        ours = {aton(a): dev for a, dev in net.address_interfaces().items()}
        t.local_addresses = set(ours)
        if t.role == "server":
            t.broadcast_addresses = net.broadcast_addresses()
        if self.fastpath is not None:
            try:
                self.fastpath.attach(net.ipv4_interfaces())
            except OSError as exc:
                log.warning("fast path: cannot attach to a new interface: %s", exc)
        routes = {}
        for peer in {f.peer for f in flows}:
            try:
                src, dev = net.source_for(_ntoa(peer))
                routes[peer] = Route(aton(src), dev)
            except (LookupError, OSError) as exc:
                log.info("no path to %s for now (%s): its flows wait", _ntoa(peer), exc)
        plan = plan_moves(flows, ours, routes, net.links_up(), self._paths_seen,
                          return_to_preferred=self.cfg.return_to_preferred,
                          follow_routes=follow_routes, force_address=force_address)
        if peer_filter is None:
            self._paths_seen = plan.seen         # (flows gone since are forgotten)
        else:
            self._paths_seen.update(plan.seen)
        now = self.clock()
        moved = 0
        for new, peers in plan.moves.items():
            for peer, ids in peers.items():
                wanted = set(ids)
                n = t.migrate(now, new, peer, lambda f: f.sal.local_flow in wanted)
                moved += n
                if n:
                    log.info("moving %d flow(s) toward %s to our address %s", n, _ntoa(peer), _ntoa(new))
        if t.role == "client" and force_address is None:
            hop = next((r.next_hop for r in self.cfg.rules if r.next_hop), None)
            try:
                src = aton(net.source_for(hop)[0]) if hop else t.sal_address
                if src != t.sal_address:
                    log.info("new flows now leave from %s (was %s)", _ntoa(src), _ntoa(t.sal_address))
                    t.sal_address = src
            except (LookupError, OSError):
                pass
        self._flush()
        return moved

    def _migrate(self, flow: str | None = None, service: str | None = None, address: str | None = None):
        """``serval ctl migrate``: move flows by hand (one flow, one service's, or all),
        to ``address`` or to wherever the routes now say."""
        wanted = None
        if flow is not None:
            fid = int(flow, 16)
            wanted = lambda f: f.sal.local_flow == fid
        elif service is not None:
            ids = {s.service_id for s in self.cfg.services if s.name == service}
            wanted = lambda f: f.sal.service_id in ids
        return {"moved": self.check_paths(wanted, aton(address) if address else None, follow_routes=True)}

    def survey_host_filters(self) -> None:
        """fast_path_redirect = "auto": redirect while this namespace has no packet
        filters but the gateways' own; a look now (every SURVEY_EVERY s and on SIGHUP)."""
        if self.fastpath is None or self.cfg.fast_path_redirect != "auto" or self._surveying:
            return
        self._surveying = True

        def apply(found: list[str]) -> None:
            on = not found
            if self.fastpath is not None and on != self.fastpath.redirect:
                self.fastpath.set_redirect(on)
                log.info("%s", redirect_said(on, found, True))

        def failed(failure) -> None:
            log.error("surveying this host's packet filters failed, redirect stays %s: %s",
                      "on" if self.fastpath and self.fastpath.redirect else "off", failure.getErrorMessage())

        def done(_) -> None:
            self._surveying = False

        self.adapters.host_filters().addCallback(apply).addErrback(failed).addBoth(done)

    # --- control -------------------------------------------------------------------
    def commands(self) -> dict:
        return {"flows": self._flows, "stats": self._stats, "config": self._config,
                "virtual_in_use": self._virtual_in_use, "migrate": self._migrate,
                **(self.routing.commands() if self.routing else {})}

    def _virtual_in_use(self):
        """Virtual addresses with a live flow (the resolver reclaims none of them)."""
        if self.cfg.role != "client":
            return []
        return sorted({_ntoa(f.legacy_dst) for f in self.translator.flows.values()
                       if f.closed_at is None and (f.legacy_key is not None or f.udp is not None)})

    def _flows(self):
        fp = self.fastpath
        if fp is not None:
            fp.refresh_all()
        rows = self.translator.flow_rows(self.clock())
        for row in rows:
            row["path"] = "kernel" if fp is not None and fp.in_kernel(int(row["local_flow"], 16)) else "python"
        return rows

    def _stats(self):
        stats = dict(self.stats)
        stats["flows_live"] = len(self.translator.flows)
        stats["uptime_s"] = round(self.clock() - self.started, 1)
        stats["fastpath"] = "on" if self.fastpath is not None else "off"
        if self.fastpath is not None:
            stats.update(self.fastpath.stats())
        stats.update(kernel_queue_stats(self.cfg.queue))
        stats.update({k.replace("kernel_", "kernel_control_"): v
                      for k, v in kernel_queue_stats(self.cfg.control_queue).items()})
        stats.update({k.replace("kernel_", "kernel_new_flow_"): v
                      for k, v in kernel_queue_stats(self.cfg.new_flow_queue).items()})
        times = sorted(self.translator.migration_times)
        if times:
            stats["migration_ms_last"] = round(self.translator.migration_times[-1] * 1000, 2)
            stats["migration_ms_p50"] = round(times[len(times) // 2] * 1000, 2)
            stats["migration_ms_p99"] = round(times[min(len(times) - 1, len(times) * 99 // 100)] * 1000, 2)
        return stats

    def _config(self):
        cfg = self.cfg
        return {"role": cfg.role, "path": cfg.path, "instance": cfg.instance, "queue": cfg.queue,
                "carriage": cfg.carriage, "services": [
                    {"name": s.name, "port": s.port, "service_id": s.service_id.hex(),
                     "address": s.address, "backend": "%s:%d" % s.backend if s.backend else None}
                    for s in cfg.services]}

    # --- helpers -------------------------------------------------------------------
    def _virtual_route(self, cfg):
        """Local processes need a route to the virtual range; add one toward the first
        next hop when the host has none (a host with a default route needs nothing).
        With the fast path taking their traffic, one through loopback in any case: there
        TCP's super-packets are cut wire-sized before the fast path meets them on the way
        in (on the way out, at tc egress, they would still be whole)."""
        probe = cfg.services[0].address if cfg.services else cfg.virtual_network.split("/")[0]
        if not self.local_in_kernel and self.net.has_route(probe) and not self._stale_route_of_ours(cfg):
            return None
        hop = next((r.next_hop for r in cfg.rules if r.next_hop), None)
        src, dev = self.net.source_for(hop) if hop else (_ntoa(self.translator.sal_address), None)
        if self.local_in_kernel:
            return {"dst": cfg.virtual_network, "dev": "lo", "prefsrc": src}
        return {"dst": cfg.virtual_network, "dev": dev, "prefsrc": src}

    def _stale_route_of_ours(self, cfg) -> bool:
        """The route to the virtual range is one a crashed run of this instance added
        (recorded in its state file): the clean-up before install removes it, so it
        must be planned again, or local processes meet ENETUNREACH after a restart."""
        from nat.routes import OwnedRoutes
        recorded = OwnedRoutes(cfg.instance, cfg.state_dir).state.get("routes") or []
        return any(r.get("dst") == cfg.virtual_network for r in recorded)

    def _log_started(self, plan) -> None:
        cfg, t = self.cfg, self.translator
        log.info("%s gateway up: queue %d, carriage %s, %d rule(s) installed, control socket %s",
                 cfg.role, cfg.queue, cfg.carriage, len(plan["prerouting"]) + len(plan["output"]),
                 cfg.control_socket)
        for svc in cfg.services:
            where = f"virtual {svc.address}:{svc.port}" if cfg.role == "client" else "backend %s:%d" % svc.backend
            log.info("service %s:%d (serviceID %s) at %s", svc.name, svc.port, short(svc.service_id), where)
        if cfg.role == "client":
            log.info("SAL address %s", _ntoa(t.sal_address))

    def _summary(self) -> str:
        keys = ("flows_opened", "to_sal", "from_sal", "malformed", "internal_errors")
        dropped = sum(v for k, v in self.stats.items() if k.startswith("dropped_"))
        return ", ".join(f"{k}={self.stats.get(k, 0)}" for k in keys) + f", dropped={dropped}"


def start_fast_path(cfg: GatewayConfig, translator, interfaces: list[str]):
    """The kernel fast path for ``cfg.fast_path``: a started FastPath, or None (said in
    one log line). With "on", a fast path that cannot start stops the gateway."""
    if cfg.fast_path == "off":
        log.info("fast path off (fast_path = \"off\"): every packet goes through Python")
        return None
    from .fastpath.manager import FastPath, FastPathUnavailable
    from .adapters import netlink
    local = set(netlink.address_interfaces())
    # on loopback too: a sidecar's backend answers over it, and a client gateway's own
    # processes reach the virtual range through it
    own = cfg.role == "client" and cfg.intercept_local
    loopback = own or (cfg.role == "server" and any(s.backend[0] in local for s in cfg.services))
    fp = FastPath(translator, cfg.instance, cfg.state_dir, MARK, cfg.bpffs, cfg.fast_path_redirect is True,
                  loopback=loopback)
    try:
        fp.start(interfaces)
    except FastPathUnavailable as exc:
        if cfg.fast_path == "on":
            raise RuntimeError(f"the fast path cannot start (fast_path = \"on\"): {exc}") from None
        log.warning("fast path unavailable, every packet goes through Python: %s", exc)
        return None
    redirect, found = cfg.fast_path_redirect, []
    if redirect == "auto":
        from .fastpath.host_filters import survey
        found = survey()
        redirect = not found
        fp.set_redirect(redirect)
    translator.refresh = fp.refresh
    log.info("fast path on: established flows translated in the kernel (tc ingress on %s)%s",
             ", ".join(sorted(fp.links)) or "no interface yet",
             "; this host's own connections to the virtual range go through lo" if own else "")
    log.info("%s", redirect_said(redirect, found, cfg.fast_path_redirect == "auto"))
    return fp


def redirect_said(on: bool, found: list[str], auto: bool) -> str:
    why = ("this namespace has no packet filters but the gateways' own" if on else "; ".join(found)) \
        if auto else "fast_path_redirect = " + ("true" if on else "false")
    return (f"fast path redirect {'on' if on else 'off'} ({why}): translated packets "
            + ("go straight to their next hop" if on else "take this host's routing and netfilter"))


def kernel_queue_stats(queue: int) -> dict:
    """The kernel's own counters for our queue (/proc/net/netfilter/nfnetlink_queue)."""
    try:
        with open("/proc/net/netfilter/nfnetlink_queue") as f:
            for line in f:
                fields = line.split()
                if fields and int(fields[0]) == queue:
                    return {"kernel_queue_waiting": int(fields[2]), "kernel_queue_dropped": int(fields[5]),
                            "kernel_user_dropped": int(fields[6])}
    except (OSError, ValueError, IndexError):
        pass
    return {}
