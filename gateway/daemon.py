"""A gateway process: config → translator, interception rules, queue reader, injector,
control socket and timers, wired to the Twisted reactor; and undone again on stop."""
import logging
import os
import time

from sal.ip import aton
from sal.serviceid import ServicePrefix, short
from sal.service_table import Action, ServiceTable

from .config import GatewayConfig
from .translate import Backend, ClientTranslator, ServerTranslator
from .translate.carriage import make_carriage
from .lifecycle import SNAPSHOT_EVERY, LifecycleMixin
from .virtual_map import VirtualMap

log = logging.getLogger("serval.gateway")
MARK = 0x5E7A1


def build_translator(cfg: GatewayConfig, source_for, config_targets: list | None = None):
    """The translator for ``cfg``; ``source_for(address) -> (our address, interface)``.
    The service-table targets the config made are appended to ``config_targets``."""
    config_targets = [] if config_targets is None else config_targets
    carriage = make_carriage(cfg.carriage, cfg.role)
    common = dict(mtu=cfg.mtu, timeouts=cfg.timeouts, limits=cfg.limits)
    table = ServiceTable()
    if cfg.role == "client":
        for rule in cfg.rules:
            table.add(rule.prefix, rule.action, rule.next_hop, rule.priority, rule.weight)
            config_targets.append((rule.prefix, rule.next_hop))
            if rule.affinity:
                table.set_affinity(rule.prefix, rule.affinity)
        first_hop = next((r.next_hop for r in cfg.rules if r.next_hop), None)
        sal_address = cfg.sal_address or source_for(first_hop)[0]
        virtual = VirtualMap({(aton(s.address), s.port): s.service_id for s in cfg.services}, cfg.mappings)
        return ClientTranslator(aton(sal_address), virtual, table, carriage, **common)
    for svc in cfg.services:
        host, port = svc.backend
        backend = Backend(aton(host), port, aton(source_for(host)[0]), svc.name)
        table.add(ServicePrefix(svc.service_id), Action.DEMUX, backend, svc.priority, svc.weight)
        config_targets.append((ServicePrefix(svc.service_id), backend))
    return ServerTranslator(table, carriage, port_range=cfg.port_range,
                            keep_client_address=cfg.client_address == "peer", **common)


def interception_plan(cfg: GatewayConfig, translator, interfaces: list[str], need_route) -> dict:
    """The rules, sysctls and routes a gateway installs (keyword arguments for
    ``nat.Interception.install``).

    Two queues: SAL control packets (those with extensions) and TCP SYNs go to
    ``cfg.control_queue``, read first and whole; the bulk goes to ``cfg.queue``, read in
    batches. So a handshake or a move never waits behind thousands of data packets."""
    from nat import ToQueue

    if cfg.carriage == "ip":
        sal_in, sal_hlen_at = ["-p", "144"], 8
    else:
        sal_in, sal_hlen_at = ["-p", "udp", "--dport", str(translator.carriage.local_port)], 16
    # the SAL header length byte is above 3 words when extensions follow
    sal_control = ToQueue(sal_in + ["-m", "u32", "--u32", f"0>>22&0x3C@{sal_hlen_at}>>24=4:255"],
                          cfg.control_queue)
    pre, out, routes = [], [], []
    # SAL to any address: addresses change under live flows, and a packet still sent to
    # the one we just lost is translated rather than lost (what is not ours passes)
    pre += [sal_control, sal_in]
    if cfg.role == "client":
        legacy = ["-p", "tcp", "-d", cfg.virtual_network]
        syn = ToQueue(legacy + ["--tcp-flags", "SYN", "SYN"], cfg.control_queue)
        if cfg.intercept_forwarded:
            pre += [syn, legacy]
        if cfg.intercept_local:
            out += [syn, legacy]
            route = need_route(cfg)
            if route:
                routes.append(route)
    else:
        low, high = cfg.port_range
        for svc in cfg.services:
            host, port = svc.backend
            match = ["-p", "tcp", "-s", host, "--sport", str(port), "--dport", f"{low}:{high}"]
            syn = ToQueue(match + ["--tcp-flags", "SYN", "SYN"], cfg.control_queue)
            pre += [syn, match]
            out += [syn, match]   # a backend on this very host (a sidecar) replies via OUTPUT
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
    def __init__(self, cfg: GatewayConfig, reactor):
        self.cfg = cfg
        self.reactor = reactor
        self.translator = None
        self.interception = None
        self.reader = self.control_reader = None
        self.injector = self.port = self.watcher = None
        self._timer = None           # one reactor call at the translator's next deadline
        self._timer_at = None
        self._path_check = None
        self.routing = None          # the control plane: routers, health, drain (gateway/routing.py)
        self.observer = None         # metrics listener, log lines derived from counters (serval/observe.py)
        self.started = time.monotonic()
        self.stats = None
        self.snapshotter = None
        self.fastpath = None         # established flows in the kernel (gateway/fastpath), or None
        self._config_targets = []    # (prefix, target) the config put in the service table

    # --- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        from nat import Interception
        from twisted.internet.task import LoopingCall
        from .adapters import control, netlink
        from .adapters.inject import Injector
        from .adapters.netwatch import NetlinkWatcher
        from .adapters.nfqueue import QueueReader
        from serval.observe import GatewayObserver
        from .routing import routing_agent

        cfg = self.cfg
        if control.in_use(cfg.control_socket):
            # a second copy must not take the running one's rules and socket away
            raise RuntimeError(f"a gateway already answers on {cfg.control_socket} (instance "
                               f"{cfg.instance!r} is running): not starting, nothing changed")
        self.translator = build_translator(cfg, netlink.source_for, self._config_targets)
        self.stats = self.translator.stats
        self.routing = routing_agent(self)
        plan = interception_plan(cfg, self.translator, netlink.ipv4_interfaces(),
                                 lambda c: self._virtual_route(c, netlink))
        self.interception = Interception(cfg.instance, cfg.queue, cfg.state_dir,
                                         bypass=cfg.queue_bypass, mark=MARK)
        self.interception.install(**plan)
        try:
            self.fastpath = start_fast_path(cfg, self.translator, netlink.ipv4_interfaces())
            self.injector = Injector(MARK, self.stats)
            self.reader = QueueReader(cfg.queue, self._handle, self._flush, self.stats, batch=64)
            self.reactor.addReader(self.reader)
            self.control_reader = QueueReader(cfg.control_queue, self._handle, self._flush, self.stats)
            self.reactor.addReader(self.control_reader)
            self.port = control.listen(self.reactor, cfg.control_socket, self.commands())
            self.watcher = NetlinkWatcher(self._on_netlink)
            self.reactor.addReader(self.watcher)
            self.resume_snapshot()
            self._flush()                       # resumed flows go back into the kernel
            if self.fastpath is not None:
                swept = self.fastpath.sweep()
                if swept:
                    log.info("fast path: %d kernel flow(s) of the previous run had no snapshot: removed", swept)
            self.snapshotter = LoopingCall(self.save_snapshot)
            self.snapshotter.start(SNAPSHOT_EVERY, now=False)
            self.routing.start()
            self.observer = GatewayObserver(self)
            self.observer.start()
        except BaseException:
            self.stop()
            raise
        self.translator.local_addresses = {aton(a) for a in netlink.address_interfaces()}
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
        for reader in (self.reader, self.control_reader):
            if reader is not None:
                self.reactor.removeReader(reader)
                reader.close()
        self.reader = self.control_reader = None
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
        now = time.monotonic()
        t = self.translator
        if payload[9] == 6:
            return t.from_legacy(payload, now) if t.role == "client" else t.from_backend(payload, now)
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
        delay = max(0.0, deadline - time.monotonic())
        if self._timer is not None and self._timer.active():
            self._timer.reset(delay)
        else:
            self._timer = self.reactor.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._timer = self._timer_at = None
        now = time.monotonic()
        deadline = self.translator.next_deadline()
        if deadline is not None and deadline <= now:
            self.translator.handle_timer(now)
        self._flush()                           # and the timer for what comes next

    # --- mobility ------------------------------------------------------------------
    def _on_netlink(self, events) -> None:
        # a change comes as a burst of messages, read together: look right after it
        if self._path_check is None or not self._path_check.active():
            self._path_check = self.reactor.callLater(0.001, self.check_paths)

    def check_paths(self, peer_filter=None, force_address: bytes | None = None) -> int:
        """Move live flows whose path broke: our address is gone, or the route to the
        peer now leaves by another interface. A new address beside a working one moves
        nothing (no churn, and a move made by hand stays). With ``force_address``, move
        the flows ``peer_filter`` accepts to that address. Returns how many moved."""
        from .adapters import netlink

        t = self.translator
        now = time.monotonic()
        moved = 0
        peers = {}
        for flow in t.flows.values():
            if flow.closed_at is None and (peer_filter is None or peer_filter(flow)):
                peers.setdefault(flow.peer_addr, set()).add(flow.local_addr)
        ours = netlink.address_interfaces()
        t.local_addresses = {aton(a) for a in ours}
        if self.fastpath is not None:
            try:
                self.fastpath.attach(netlink.ipv4_interfaces())
            except OSError as exc:
                log.warning("fast path: cannot attach to a new interface: %s", exc)
        for peer, locals_ in peers.items():
            new = force_address
            if new is None:
                try:
                    src, dev = netlink.source_for(_ntoa(peer))
                except (LookupError, OSError) as exc:
                    log.info("no path to %s for now (%s): its flows wait", _ntoa(peer), exc)
                    continue
                new = aton(src)
                if all(ours.get(_ntoa(addr)) == dev for addr in locals_):
                    continue                      # every flow's address still works there
                if not self.cfg.return_to_preferred:
                    up = netlink.links_up()
                    if all(ours.get(_ntoa(addr)) in up for addr in locals_):
                        continue                  # the path in use still works: stay on it
            n = t.migrate(now, new, peer, peer_filter)
            moved += n
            if n:
                log.info("moving %d flow(s) toward %s to our address %s", n, _ntoa(peer), _ntoa(new))
        if t.role == "client" and force_address is None:
            hop = next((r.next_hop for r in self.cfg.rules if r.next_hop), None)
            try:
                src = aton(netlink.source_for(hop)[0]) if hop else t.sal_address
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
        return {"moved": self.check_paths(wanted, aton(address) if address else None)}

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
                       if f.closed_at is None and f.legacy_key is not None})

    def _flows(self):
        fp = self.fastpath
        if fp is not None:
            fp.refresh_all()
        rows = self.translator.flow_rows(time.monotonic())
        for row in rows:
            row["path"] = "kernel" if fp is not None and fp.in_kernel(int(row["local_flow"], 16)) else "python"
        return rows

    def _stats(self):
        stats = dict(self.stats)
        stats["flows_live"] = len(self.translator.flows)
        stats["uptime_s"] = round(time.monotonic() - self.started, 1)
        stats["fastpath"] = "on" if self.fastpath is not None else "off"
        if self.fastpath is not None:
            stats.update(self.fastpath.stats())
        stats.update(kernel_queue_stats(self.cfg.queue))
        stats.update({k.replace("kernel_", "kernel_control_"): v
                      for k, v in kernel_queue_stats(self.cfg.control_queue).items()})
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
    def _virtual_route(self, cfg, netlink):
        """Local processes need a route to the virtual range; add one toward the first
        next hop when the host has none (a host with a default route needs nothing)."""
        probe = cfg.services[0].address if cfg.services else cfg.virtual_network.split("/")[0]
        if netlink.has_route(probe):
            return None
        hop = next(r.next_hop for r in cfg.rules if r.next_hop)
        src, dev = netlink.source_for(hop)
        return {"dst": cfg.virtual_network, "dev": dev, "prefsrc": src}

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
    fp = FastPath(translator, cfg.instance, cfg.state_dir, MARK, cfg.bpffs, cfg.fast_path_redirect)
    try:
        fp.start(interfaces)
    except FastPathUnavailable as exc:
        if cfg.fast_path == "on":
            raise RuntimeError(f"the fast path cannot start (fast_path = \"on\"): {exc}") from None
        log.warning("fast path unavailable, every packet goes through Python: %s", exc)
        return None
    translator.refresh = fp.refresh
    log.info("fast path on: established flows translated in the kernel (tc ingress on %s)",
             ", ".join(sorted(fp.links)) or "no interface yet")
    return fp


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
