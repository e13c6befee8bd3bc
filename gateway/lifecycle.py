"""A gateway's life beyond start and stop: drain on SIGTERM, reload on SIGHUP, and a
snapshot of its established flows so that a quick restart resumes them."""
import json
import logging
import os
import signal
import time

from .config import ConfigError, load
from .translate import snapshot

log = logging.getLogger("serval.gateway")

# what a running gateway cannot take from a reloaded config (its rules and queues)
NEEDS_RESTART = ("queue", "control_queue", "new_flow_queue", "carriage", "virtual_network", "intercept_local",
                 "intercept_forwarded", "instance", "control_socket", "state_dir", "port_range",
                 "source_addresses", "client_address", "mtu", "queue_bypass", "sal_address", "mappings",
                 "metrics", "fast_path", "bpffs", "fast_path_redirect",
                 "routing")     # the routers, key and checks the control plane was built with
SNAPSHOT_EVERY = 1.0


class LifecycleMixin:
    _draining = False
    _drain_check = None
    _snapshot_sig = None
    fastpath = None

    # --- signals -------------------------------------------------------------------
    def install_signals(self) -> None:
        """SIGTERM/SIGINT drain (a second one stops at once); SIGHUP reloads."""
        def later(fn):
            return lambda *_: self.reactor.callFromThread(fn)
        signal.signal(signal.SIGTERM, later(self.drain_and_stop))
        signal.signal(signal.SIGINT, later(self.drain_and_stop))
        signal.signal(signal.SIGHUP, later(self.reload))

    def drain_and_stop(self) -> None:
        if self._draining:
            log.info("stopping now (second signal)")
            self.reactor.stop()
            return
        self._draining = True
        self.translator.accepting = False
        if self.routing is not None:           # routers stop sending us new flows
            self.routing.stop()
            self.routing = None
        deadline = self.clock() + self.cfg.drain_timeout
        udp = sum(1 for f in self.translator.flows.values() if f.closed_at is None and f.udp is not None)
        log.info("draining: no new flows; waiting up to %.0f s for %d live connection(s)%s",
                 self.cfg.drain_timeout, self._live_flows(),
                 f" ({udp} UDP flow(s) have no close to wait for: saved for a quick restart)" if udp else "")

        def check():
            if self._live_flows() == 0 or self.clock() >= deadline:
                left = self._live_flows()
                if left:
                    log.info("drain time is up: %d flow(s) still live (saved for a quick restart)", left)
                self.reactor.stop()
            else:
                self._drain_check = self.reactor.callLater(0.1, check)
        check()

    def _live_flows(self) -> int:
        """TCP connections still open: what a drain waits for. A UDP flow ends only by
        going idle, which waiting would not hasten."""
        return sum(1 for f in self.translator.flows.values() if f.closed_at is None and f.udp is None)

    # --- reload --------------------------------------------------------------------
    def reload(self) -> None:
        """SIGHUP: take what a running gateway can from the config file (its rules,
        services, timeouts, limits, log level). The service table is rewritten by its
        owner from the new rules, with router health and drain state as they are."""
        from .table_owner import config_rules
        try:
            new = load(self.cfg.path, self.cfg.role)
        except ConfigError as exc:
            log.error("reload refused, the running config stays: %s", exc)
            return
        changed = [k for k in NEEDS_RESTART if getattr(new, k) != getattr(self.cfg, k)]
        if changed:
            log.error("reload refused: %s changed, which needs a restart", ", ".join(changed))
            return
        if self.cfg.role == "server" and self.cfg.routing and new.services != self.cfg.services:
            log.error("reload refused: services change under [routing] needs a restart")
            return
        try:
            rules = config_rules(new, self.net.source_for)
        except (LookupError, OSError) as exc:
            from .reachability import NoRoute, unreachable_at_start
            said = unreachable_at_start(new, exc) if isinstance(exc, NoRoute) else exc
            log.error("reload refused, the running config stays: %s", said)
            return
        t = self.translator
        t.timeouts, t.limits = new.timeouts, new.limits
        if new.role == "server":
            t.backend_time_wait, t.accept_broadcast_syn = new.backend_time_wait, new.accept_broadcast_syn
        # a --log-level given on the command line outranks the file
        logging.getLogger("serval").setLevel((getattr(self, "cli_log_level", None) or new.log_level).upper())
        if new.role == "client":
            from .daemon import virtual_services
            t.resolve.fixed, t.resolve.fixed_udp = virtual_services(new)
        self.table.set_rules(rules)
        if new.role == "server":
            from .daemon import interception_plan
            plan = interception_plan(new, t, [], lambda c: None, self.local_in_kernel)
            self.interception.firewall.install(plan["prerouting"], plan["output"])   # atomic
        self.cfg.__dict__.update({k: v for k, v in new.__dict__.items() if k not in NEEDS_RESTART})
        log.info("reloaded %s: %d service(s), %d route(s); live flows untouched",
                 new.path, len(new.services), len(new.rules))
        self.survey_host_filters()          # fast_path_redirect = "auto": a fresh look

    # --- snapshot ------------------------------------------------------------------
    def snapshot_path(self) -> str:
        from nat.state import netns_id
        return os.path.join(self.cfg.state_dir, f"{self.cfg.instance}.net{netns_id()}.flows.json")

    def save_snapshot(self, force: bool = False) -> None:
        if self.fastpath is not None:
            self.fastpath.refresh_all()         # the kernel's counts, into the flows
        s = self.stats
        sig = (len(self.translator.flows), s["flows_opened"], s["flows_closed"], s["flows_reset"],
               s["flows_established"], s["migrations_completed"], s["peer_migrations_completed"])
        if sig == self._snapshot_sig and not force:
            # nothing opened, closed or moved: the file still says it all, and its time
            # says it is current (a steady flow must stay resumable however old it is)
            try:
                os.utime(self.snapshot_path())
            except OSError:
                pass
            return
        self._snapshot_sig = sig
        from nat.state import netns_cookie
        data = snapshot.dump(self.translator, self.clock())
        data["written"] = time.time()
        data["netns"] = netns_cookie()
        path = self.snapshot_path()
        tmp = path + ".tmp"
        if not data["flows"] and not data["udp_flows"]:
            # nothing to resume: leave no file behind (one per namespace adds up)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "w") as f:
                json.dump(data, f)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot save the flow snapshot %s: %s", path, exc)

    def resume_snapshot(self) -> int:
        """Take back the flows of a run that stopped less than resume_window ago."""
        path = self.snapshot_path()
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            log.warning("ignoring the flow snapshot %s: %s", path, exc)
            return 0
        from nat.state import same_namespace
        if not same_namespace(data.get("netns")):
            # a deleted namespace's, whose inode this one got: its flows were never here
            log.info("flow snapshot %s is an earlier namespace's (same inode, another cookie): "
                     "starting afresh", path)
            os.unlink(path)
            return 0
        try:
            written = max(data.get("written", 0), os.path.getmtime(path))
        except OSError:
            written = data.get("written", 0)
        age = time.time() - written
        if age > self.cfg.resume_window:
            log.info("flow snapshot is %.0f s old (resume_window %.0f s): starting afresh",
                     age, self.cfg.resume_window)
            return 0
        n = snapshot.restore(self.translator, data, self.clock())
        if n:
            log.info("resumed %d established flow(s) from a snapshot %.1f s old", n, age)
        return n
