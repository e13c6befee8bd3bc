"""What each daemon tells its operator beside its control socket: Prometheus metrics
(``serval/metrics.py`` serves them) and the log lines derived from its counters.

The sans-IO cores (translators, router core, resolver core) count events and log
nothing. An observer, started and stopped by its daemon, reads them:

* as the daemon drains a translator's flow events (``flow_events``): per-flow lines at
  DEBUG (opened, moved, closed);
* every second (``tick``): the rare events promptly: migrations completed, registrations
  acknowledged, refused, appearing or ending;
* every minute (``summarize``): one INFO line per subject in which something happened
  (flows opened and closed, packets dropped by reason, queries by result...), and
  warnings for limits hit and packets the kernel dropped at our queues;
* at each scrape (``collect``): the metric families, built from the counters there and
  then (the observer is its daemon's prometheus_client collector: ``self.registry``).

docs/operations.md lists every metric and line.
"""
from __future__ import annotations

import logging
import time
from collections import Counter

from prometheus_client.core import CounterMetricFamily as CounterFamily
from prometheus_client.core import GaugeMetricFamily as GaugeFamily

from serval import metrics as m
from serval.logs import event
from serval.metrics import Histogram

log = logging.getLogger("serval.observe")
flow_log = logging.getLogger("serval.flow")
log_gw = logging.getLogger("serval.gateway")
log_routing = logging.getLogger("serval.routing")
log_router = logging.getLogger("serval.router")
log_dns = logging.getLogger("serval.dns")
TICK = 1.0                   # seconds between looks at the counters
SUMMARY_EVERY = 60.0         # seconds between summary lines


def _ntoa(addr) -> str:
    return ".".join(str(b) for b in addr) if isinstance(addr, (bytes, bytearray)) and len(addr) == 4 else str(addr)


def _counts(deltas: dict, keys: dict) -> list[str]:
    """``["120 opened", "2 reset"]`` for the non-zero ``deltas`` of ``keys`` (key -> word)."""
    return [f"{deltas[k]} {word}" for k, word in keys.items() if deltas.get(k)]


def _by_reason(deltas: dict, prefix: str, top: int = 8) -> tuple[int, dict, str]:
    """(total, {reason: n}, "reason n, ...") of the non-zero deltas of ``prefix*`` keys."""
    found = {k[len(prefix):]: v for k, v in deltas.items() if k.startswith(prefix) and v > 0}
    ranked = sorted(found.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{k} {v}" for k, v in ranked[:top]) + (", ..." if len(ranked) > top else "")
    return sum(found.values()), found, text


class Deltas:
    """How much each counter of ``read()`` grew since the last ``take()``."""

    def __init__(self, read):
        self.read = read
        self.last = dict(read())

    def take(self) -> dict:
        now = dict(self.read())
        last = self.last
        self.last = now
        return {k: v - last.get(k, 0) for k, v in now.items() if v != last.get(k, 0)}


class TimesFeed:
    """New entries of a bounded list of durations that a core appends to and trims
    (``migration_times``), found by a monotonic count of appends, into a histogram."""

    def __init__(self, times, count, histogram: Histogram):
        self.times, self.count, self.histogram = times, count, histogram
        self.seen = count()

    def pull(self) -> list[float]:
        total = self.count()
        new = total - self.seen
        self.seen = total
        if new <= 0:
            return []
        values = list(self.times()[-new:])
        for v in values:
            self.histogram.observe(v)
        return values


# --- the common part ----------------------------------------------------------------------
class Observer:
    prefix = "serval"

    def __init__(self, reactor, address, tick: float = TICK, summary_every: float = SUMMARY_EVERY,
                 clock=time.monotonic):
        self.reactor, self.address = reactor, address
        self.tick_every, self.summary_every = tick, summary_every
        self.clock = clock
        self.port = self.timer = None
        self.started_wall = time.time()
        self.last_summary = clock()
        self.failed = False
        self.registry = m.registry(self.collect)

    def start(self) -> None:
        from twisted.internet.task import LoopingCall
        if self.address is not None:
            self.port = m.listen(self.reactor, self.address, self.registry)
            host, port = self.address
            event(log, logging.INFO, "metrics_listening", "metrics at http://%s/metrics",
                  f"[{host}]:{port}" if ":" in host else f"{host}:{port}", address=f"{host}:{port}")
        self.timer = LoopingCall(self._tick)
        self.timer.clock = self.reactor
        self.timer.start(self.tick_every, now=False)

    def stop(self) -> None:
        if self.timer is not None and self.timer.running:
            self.timer.stop()
        self.timer = None
        if self.port is not None:
            self.port.stopListening()
            self.port = None

    def _tick(self) -> None:
        try:
            now = self.clock()
            self.tick(now)
            if now - self.last_summary >= self.summary_every:
                self.summarize(now, now - self.last_summary)
                self.last_summary = now
        except Exception:          # a bug here must not stop the timer, nor the daemon
            log.log(logging.DEBUG if self.failed else logging.ERROR, "observer tick", exc_info=True)
            self.failed = True     # one traceback at error, the repeats at debug

    def tick(self, now: float) -> None:
        pass

    def summarize(self, now: float, seconds: float) -> None:
        pass

    def collect(self) -> list:
        """The metric families, read from the daemon at this moment (on the reactor)."""
        return [GaugeFamily(f"{self.prefix}_start_time_seconds", "When the daemon started (Unix time)",
                            value=round(self.started_wall, 3))]

    def leftovers(self, stats: dict, used: set) -> CounterFamily:
        """Every counter of ``serval ctl stats`` not exposed under a name of its own."""
        fam = CounterFamily(f"{self.prefix}_stat_total",
                            "Counters of `serval ctl stats` without a metric of their own, by name", labels=["stat"])
        for key in sorted(stats):
            v = stats[key]
            if key not in used and isinstance(v, (int, float)) and not isinstance(v, bool):
                fam.add_metric([key], v)
        return fam


class _Used(dict):
    """A stats dict that remembers which keys were read."""

    def __init__(self, data):
        super().__init__(data)
        self.used = set()

    def __call__(self, key: str):
        self.used.add(key)
        return self.get(key, 0)


# --- gateways -------------------------------------------------------------------------------
class FlowWatch:
    """Per-flow lines at DEBUG (opened, moved, closed), from the translator's events
    (gateway/translate/events.py) as the daemon drains them; and, at each scrape, the
    flow table's states and byte totals."""

    def __init__(self, translator, services):
        self.t = translator
        self.services = services                 # () -> the config's [[service]] list (a reload replaces it)
        self._names = (None, {})                 # (that list, serviceID -> name)
        self._said_closed: set[int] = set()      # flowIDs whose close was told (until they go)

    def handle(self, events) -> None:
        if not flow_log.isEnabledFor(logging.DEBUG):
            return
        from gateway.translate.events import FlowClosed, FlowClosing, FlowEstablished, FlowMoved
        for ev in events:
            flow = ev.flow
            if isinstance(ev, FlowEstablished):
                self._opened(flow)
            elif isinstance(ev, FlowMoved):
                (old_local, old_peer), (new_local, new_peer) = ev.old, ev.new
                if old_local != new_local:
                    self._moved(flow, "our address", old_local, new_local)
                if old_peer != new_peer:
                    self._moved(flow, "peer", old_peer, new_peer)
            elif isinstance(ev, FlowClosing):
                if flow.closed_at is not None and flow.sal.local_flow not in self._said_closed:
                    self._said_closed.add(flow.sal.local_flow)
                    self._closed(flow)
            elif isinstance(ev, FlowClosed):
                if flow.sal.local_flow in self._said_closed:
                    self._said_closed.discard(flow.sal.local_flow)
                else:
                    self._gone(flow, ev.reason)

    # --- per-flow lines (DEBUG) ----------------------------------------------------------
    def _describe(self, flow) -> dict:
        # (a UDP flow has its legacy ends but no legacy_key, which is TCP's)
        legacy = (f"{_ntoa(flow.legacy_src)}:{flow.legacy_sport} -> {_ntoa(flow.legacy_dst)}:{flow.legacy_dport}"
                  + ("/udp" if flow.sal.protocol == 17 else "")
                  if getattr(flow, "legacy_src", None) is not None else "-")
        sid = flow.sal.service_id
        services = self.services()
        if self._names[0] is not services:
            self._names = (services, {s.service_id: s.name for s in services})
        service = self._names[1].get(sid) or (sid[:8].hex() if sid else "-")
        return {"flow": f"{flow.sal.local_flow:08x}", "legacy": legacy, "service": service,
                "peer": _ntoa(flow.peer_addr), "local": _ntoa(flow.local_addr)}

    def _opened(self, flow) -> None:
        d = self._describe(flow)
        state = flow.sal.state.value if flow.sal.state else "-"
        event(flow_log, logging.DEBUG, "flow_opened", "flow %s opened: %s, service %s, peer %s (%s)",
              d["flow"], d["legacy"], d["service"], d["peer"], state, state=state, **d)

    def _closed(self, flow) -> None:
        d = self._describe(flow)
        reason = flow.sal.state.value if flow.sal.state else "closed"
        age = max(0.0, flow.closed_at - flow.created)
        event(flow_log, logging.DEBUG, "flow_closed", "flow %s %s after %.1f s: %s, service %s, %d bytes out, %d in",
              d["flow"], reason, age, d["legacy"], d["service"], flow.bytes_out, flow.bytes_in,
              reason=reason, seconds=round(age, 3), bytes_out=flow.bytes_out, bytes_in=flow.bytes_in, **d)

    def _moved(self, flow, what: str, old, new) -> None:
        d = self._describe(flow)
        event(flow_log, logging.DEBUG, "flow_migrated", "flow %s moved: %s %s -> %s (%s)",
              d["flow"], what, _ntoa(old), _ntoa(new), d["legacy"], side="local" if what == "our address" else "peer",
              previous=_ntoa(old), **d)

    def _gone(self, flow, reason: str) -> None:
        """A flow that left the tables without closing: idle, evicted or replaced."""
        d = self._describe(flow)
        age = max(0.0, flow.last_seen - flow.created)
        event(flow_log, logging.DEBUG, "flow_closed", "flow %s forgotten (%s) after %.1f s: %s, service %s",
              d["flow"], reason, age, d["legacy"], d["service"], reason=reason,
              seconds=round(age, 3), bytes_out=flow.bytes_out, bytes_in=flow.bytes_in, **d)

    def totals(self) -> tuple[int, int]:
        """Bytes (to SAL, from SAL) so far: those of the flows the translator forgot and
        of its live flows."""
        t = self.t
        flows = t.flows.values()
        return (t.forgotten_bytes_out + sum(f.bytes_out for f in flows),
                t.forgotten_bytes_in + sum(f.bytes_in for f in flows))

    def states(self) -> Counter:
        return Counter(f.sal.state.value if f.sal.state else "new" for f in self.t.flows.values())


FLOW_ENDS = {"flows_closed": "closed", "flows_reset": "reset", "flows_refused": "refused",
             "flows_failed": "failed", "flows_idle_expired": "idle"}


class GatewayObserver(Observer):
    prefix = "serval_gateway"

    def __init__(self, gateway, **kwargs):
        super().__init__(gateway.reactor, getattr(gateway.cfg, "metrics", None), **kwargs)
        self.gw = gateway
        t = gateway.translator
        self.watch = FlowWatch(t, lambda: self.gw.cfg.services)
        self.handshakes, self.migrations = Histogram(), Histogram()
        self.migration_feed = TimesFeed(lambda: t.migration_times,
                                        lambda: t.stats.get("migrations_completed", 0), self.migrations)
        self.handshake_feed = TimesFeed(lambda: t.handshake_times,
                                        lambda: t.stats.get("handshakes_completed", 0), self.handshakes)
        self.prompt = Deltas(lambda: self.gw.stats)
        self.periodic = Deltas(self._periodic_counters)
        self.router_states: dict = {}

    def flow_events(self, events) -> None:
        """The translator's events, as the daemon drains them (never raises)."""
        try:
            self.watch.handle(events)
        except Exception:          # observing must never hurt the data path
            log.log(logging.DEBUG if self.failed else logging.ERROR, "observer flow events", exc_info=True)
            self.failed = True

    def queues(self) -> dict:
        cfg = self.gw.cfg
        return {cfg.queue: "bulk", cfg.control_queue: "control", cfg.new_flow_queue: "new_flows"}

    def _periodic_counters(self) -> dict:
        out = dict(self.gw.stats)
        for number, c in m.nfqueue_counters().items():
            if number in self.queues():
                out[f"kernel {number} dropped"] = c["dropped"]
                out[f"kernel {number} user_dropped"] = c["user_dropped"]
        return out

    # --- lines ------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        self.handshake_feed.pull()
        times = self.migration_feed.pull()
        d = self.prompt.take()
        done = d.get("migrations_completed", 0)
        if done > 0:
            ms = sorted(v * 1000 for v in times)
            how = (f"{ms[0]:.1f} ms" if len(ms) == 1 else
                   f"median {ms[len(ms) // 2]:.1f} ms, max {ms[-1]:.1f} ms") if ms else "no timing"
            event(log_gw, logging.INFO, "migrations_completed",
                  "migrations: %d completed in the last %.0f s (%s)", done, self.tick_every, how,
                  count=done, median_ms=round(ms[len(ms) // 2], 2) if ms else None,
                  max_ms=round(ms[-1], 2) if ms else None)
        moved = d.get("peer_migrations_completed", 0)
        if moved > 0:
            event(log_gw, logging.INFO, "peer_migrated",
                  "peer moved: %d flow(s) now follow the peer's new address", moved, count=moved)
        self._registration_lines(now)

    def _registration_lines(self, now: float) -> None:
        registrar = getattr(self.gw.routing, "registrar", None)
        if registrar is None:
            return
        for router, view in registrar.views.items():
            if view.status:
                state = "refused"
            elif view.acked is not None and now - view.acked <= registrar.hold:
                state = "acknowledged"
            else:
                state = "silent" if view.acked is not None else "waiting"
            was = self.router_states.get(router, "waiting")
            self.router_states[router] = state
            if state == was or state == "waiting":
                continue
            where = f"{router[0]}:{router[1]}"
            if state == "acknowledged":
                event(log_routing, logging.INFO, "registration_acknowledged",
                      "router %s acknowledges our registration", where, router=where)
            elif state == "refused":
                event(log_routing, logging.WARNING, "registration_refused",
                      "router %s refuses our registration (is our key allowed these service names?)",
                      where, router=where)
            else:
                event(log_routing, logging.WARNING, "registration_unacknowledged",
                      "router %s has not acknowledged our registration for %.1f s", where,
                      now - view.acked, router=where, seconds=round(now - view.acked, 2))

    def summarize(self, now: float, seconds: float) -> None:
        d = self.periodic.take()
        span = round(seconds)
        ends = _counts(d, {"flows_opened": "opened", "flows_resumed": "resumed", "flows_closed": "closed",
                           "flows_reset": "reset", "flows_refused": "refused", "flows_failed": "failed",
                           "flows_idle_expired": "expired idle"})
        if ends:
            live = sum(1 for f in self.gw.translator.flows.values() if f.closed_at is None)
            fields = {word.replace(" ", "_"): d.get(k, 0) for k, word in
                      {"flows_opened": "opened", "flows_closed": "closed", "flows_reset": "reset",
                       "flows_refused": "refused", "flows_failed": "failed", "flows_idle_expired": "expired"}.items()}
            event(flow_log, logging.INFO, "flows_summary", "flows: %s in the last %d s; %d live",
                  ", ".join(ends), span, live, seconds=span, live=live, **fields)
        dropped, reasons, text = _by_reason(d, "dropped_")
        if dropped:
            event(log_gw, logging.INFO, "drops_summary", "dropped %d packet(s) in the last %d s: %s",
                  dropped, span, text, seconds=span, dropped=dropped, reasons=reasons)
        hits, limits, text = _by_reason(d, "limit_")
        if hits:
            event(log_gw, logging.WARNING, "limits_hit", "limits hit %d time(s) in the last %d s: %s",
                  hits, span, text, seconds=span, limits=limits)
        if d.get("holds_timed_out"):
            event(log_gw, logging.WARNING, "holds_timed_out",
                  "%d move(s) unconfirmed after the hold time in the last %d s: held packets sent to the "
                  "old path", d["holds_timed_out"], span, count=d["holds_timed_out"], seconds=span)
        for number, purpose in sorted(self.queues().items()):
            full, user = d.get(f"kernel {number} dropped", 0), d.get(f"kernel {number} user_dropped", 0)
            if full > 0 or user > 0:
                event(log_gw, logging.WARNING, "kernel_queue_drops",
                      "kernel queue %d (%s) dropped %d packet(s) in the last %d s (queue full %d, socket "
                      "buffer full %d): the gateway is not keeping up", number, purpose, full + user, span,
                      full, user, queue=number, purpose=purpose, queue_full=full, socket_full=user, seconds=span)
        if d.get("internal_errors"):
            event(log_gw, logging.ERROR, "internal_errors", "%d internal error(s) in the last %d s",
                  d["internal_errors"], span, count=d["internal_errors"], seconds=span)

    # --- metrics ----------------------------------------------------------------------------
    def collect(self) -> list:
        now = self.clock()
        fastpath = getattr(self.gw, "fastpath", None)
        if fastpath is not None:
            fastpath.refresh_all()                  # the kernel's counts, into the flows
        self.migration_feed.pull()
        self.handshake_feed.pull()
        p, cfg = self.prefix, self.gw.cfg
        s = _Used({**self.gw.stats, **(fastpath.stats() if fastpath is not None else {})})
        bytes_out, bytes_in = self.watch.totals()
        fams = super().collect()
        info = GaugeFamily(f"{p}_info", "Always 1; the labels say which gateway this is",
                           labels=["role", "instance", "carriage"])
        info.add_metric([cfg.role, cfg.instance, cfg.carriage], 1)
        packets = CounterFamily(f"{p}_translated_packets_total",
                                "Packets translated: to_sal (legacy TCP carried on as SAL) and from_sal "
                                "(SAL delivered as legacy TCP), in Python and in the kernel's fast path",
                                labels=["direction"])
        packets.add_metric(["to_sal"], s("to_sal") + s("fastpath_to_sal"))
        packets.add_metric(["from_sal"], s("from_sal") + s("fastpath_from_sal"))
        octets = CounterFamily(f"{p}_translated_bytes_total",
                               "TCP bytes (headers included) translated, by direction, from the flows' counters",
                               labels=["direction"])
        octets.add_metric(["to_sal"], bytes_out)
        octets.add_metric(["from_sal"], bytes_in)
        fams += [info, packets,
                 GaugeFamily(f"{p}_fastpath_flows",
                             "Established flows the kernel translates now (0 when the fast path is off)",
                             value=s("fastpath_flows")),
                 octets]
        drops = CounterFamily(f"{p}_dropped_packets_total",
                              "Packets dropped instead of translated, by reason (the dropped_* counters)",
                              labels=["reason"])
        limits = CounterFamily(f"{p}_limit_hits_total",
                               "Times a cap of [limits] was hit, by limit (the limit_* counters)", labels=["limit"])
        for key in sorted(s):
            if key.startswith("dropped_"):
                drops.add_metric([key[len("dropped_"):]], s(key))
            elif key.startswith("limit_"):
                limits.add_metric([key[len("limit_"):]], s(key))
        fams += [drops, limits,
                 CounterFamily(f"{p}_malformed_packets_total",
                               "Packets that were not valid IPv4/TCP/SAL (also counted in dropped by reason)",
                               value=s("malformed"))]
        states = self.watch.states()
        flows = GaugeFamily(f"{p}_flows", "Flows in the table, by SAL state (closed ones linger a few seconds)",
                            labels=["state"])
        for state in ("syn-sent", "syn-seen", "syn-received", "established", "closed", "reset", "failed"):
            flows.add_metric([state], states.pop(state, 0))
        for state, n in sorted(states.items()):
            flows.add_metric([state], n)
        fams += [flows, CounterFamily(f"{p}_flows_opened_total", "Flows opened (SYNs translated into new flows)",
                                      value=s("flows_opened"))]
        if cfg.role == "client" or "flows_established" in s:
            fams.append(CounterFamily(f"{p}_flows_established_total",
                                      "Flows whose SAL handshake completed (client gateway: SYN-ACK received)",
                                      value=s("flows_established")))
        ended = CounterFamily(f"{p}_flows_ended_total",
                              "Flows ended, by how: closed (both FINs), reset, refused (by the backend), failed "
                              "(control packets unanswered), idle (expired)", labels=["reason"])
        for key, reason in FLOW_ENDS.items():
            ended.add_metric([reason], s(key))
        fams.append(ended)
        if "flows_resumed" in s:
            fams.append(CounterFamily(f"{p}_flows_resumed_total", "Flows taken back from a snapshot at start",
                                      value=s("flows_resumed")))
        for key, help_text in (
                ("migrations_started", "Moves of our flows to a new address of ours started (RSYN sent)"),
                ("migrations_completed", "Moves of our flows confirmed by the peer (RSYN answered)"),
                ("peer_migrations_seen", "Moves announced by the peer (RSYN received)"),
                ("peer_migrations_completed", "Moves of the peer confirmed here (we switched to its new address)"),
                ("packets_held", "Legacy packets held while a move was unconfirmed"),
                ("packets_released", "Held packets sent on once the path was known"),
                ("holds_timed_out", "Holds that ended by time-out (sent to the path in use)"),
                ("control_retransmits", "SAL control packets retransmitted (SYN, FIN, RSYN...)")):
            fams.append(CounterFamily(f"{p}_{key}_total", help_text, value=s(key)))
        resets = CounterFamily(f"{p}_resets_total",
                               "Resets: sal_sent, sal_received, legacy_sent (TCP RST to a legacy host), tcp_seen",
                               labels=["kind"])
        for key, kind in (("sal_resets_sent", "sal_sent"), ("sal_resets_received", "sal_received"),
                          ("legacy_resets_sent", "legacy_sent"), ("tcp_resets_seen", "tcp_seen")):
            resets.add_metric([kind], s(key))
        fams += [resets,
                 self.handshakes.family(f"{p}_handshake_seconds",
                                        "SAL handshake time: client gateway, SYN sent to SYN-ACK received; server "
                                        "gateway, SYN received to the handshake's ACK"),
                 self.migrations.family(f"{p}_migration_seconds",
                                        "Time from moving a flow (RSYN sent) to the confirmed path"),
                 CounterFamily(f"{p}_internal_errors_total", "Packets whose handling raised (dropped; see the log)",
                               value=s("internal_errors")),
                 CounterFamily(f"{p}_injected_packets_total",
                               "Packets we sent ourselves (control packets, resets, released SYNs)",
                               value=s("injected"))]
        s("syn_redirected")            # the same event as syns_redirected, counted per flow
        if cfg.role == "client":
            fams.append(CounterFamily(f"{p}_syns_redirected_total",
                                      "SYNs sent again to a live router after theirs went down",
                                      value=s("syns_redirected")))
        fams += self._routing_families(now)
        fams += m.nfqueue_families(p, self.queues())
        fams.append(self.leftovers(s, s.used))
        return fams

    def _routing_families(self, now: float) -> list:
        p, agent, fams = self.prefix, self.gw.routing, []
        registrar = getattr(agent, "registrar", None)
        if registrar is not None:
            st = registrar.stats
            sent = CounterFamily(f"{p}_registrations_sent_total",
                                 "Registration messages sent, by type (each goes to every router)", labels=["type"])
            sent.add_metric(["register"], st.get("sent_register", 0))
            sent.add_metric(["unregister"], st.get("sent_unregister", 0))
            acks = CounterFamily(f"{p}_registration_acks_total",
                                 "Routers' answers to our registrations, by status: applied or refused",
                                 labels=["status"])
            acks.add_metric(["applied"], st.get("acks", 0) - st.get("acks_refused", 0))
            acks.add_metric(["refused"], st.get("acks_refused", 0))
            acked = GaugeFamily(f"{p}_router_acknowledged",
                                "1 while the router has acknowledged our registration within the hold time",
                                labels=["router"])
            for router, view in registrar.views.items():
                ok = view.acked is not None and now - view.acked <= registrar.hold and not view.status
                acked.add_metric([f"{router[0]}:{router[1]}"], int(ok))
            offered = GaugeFamily(f"{p}_service_state",
                                  "1 for the state each service is in: registered, withdrawn (backend down), "
                                  "draining, checking (not checked yet)", labels=["service", "state"])
            for key, offer in registrar.offers.items():
                for state in ("registered", "withdrawn", "draining", "checking"):
                    offered.add_metric([str(key), state], int(offer.state == state))
            fams += [sent, acks, acked, offered]
        checks = getattr(agent, "checks", None)
        if checks:
            up = GaugeFamily(f"{p}_backend_up", "Backend health: 1 up, 0 down (absent until checked)",
                             labels=["backend"])
            results = CounterFamily(f"{p}_backend_checks_total", "Backend health checks, by result",
                                    labels=["backend", "result"])
            for (host, port), check in checks.items():
                where = f"{host}:{port}"
                if check.up is not None:
                    up.add_metric([where], int(check.up))
                results.add_metric([where, "ok"], check.checks - check.failures)
                results.add_metric([where, "failed"], check.failures)
            fams += [up, results]
        health = getattr(agent, "health", None)
        if health is not None:
            up = GaugeFamily(f"{p}_router_up", "1 while the router answers our probes ready", labels=["router"])
            rtt = GaugeFamily(f"{p}_router_rtt_seconds", "Round trip of the router's last probe answer",
                              labels=["router"])
            for row in health.rows(now):
                up.add_metric([str(row["router"])], int(row["state"] == "live"))
                if row["rtt_ms"] is not None:
                    rtt.add_metric([str(row["router"])], row["rtt_ms"] / 1000)
            fams += [up, rtt]
        return fams


# --- routers --------------------------------------------------------------------------------
REGISTRY_EVENTS = {"registrations_new": "new", "registrations_moved": "moved", "refreshes": "refreshed",
                   "unregistrations": "unregistered", "registrations_expired": "expired"}


class RouterObserver(Observer):
    prefix = "serval_router"
    REGISTRY_CHECK = 0.05        # seconds: registrations come and go faster than the tick

    def __init__(self, router, **kwargs):
        super().__init__(router.reactor, getattr(router.cfg, "metrics", None), **kwargs)
        self.router = router
        core = router.core
        self.prompt = Deltas(lambda: core.stats)
        self.registry_deltas = Deltas(lambda: core.registry.stats)
        self.periodic = Deltas(lambda: {**core.stats, **{f"kernel {k}": v for k, v in self._kernel().items()}})
        self.registrations = self._registrations()
        self.version = core.registry.version
        self.registry_timer = None

    def start(self) -> None:
        from twisted.internet.task import LoopingCall
        super().start()
        self.registry_timer = LoopingCall(self._registry_check)
        self.registry_timer.clock = self.reactor
        self.registry_timer.start(self.REGISTRY_CHECK, now=False)

    def stop(self) -> None:
        if self.registry_timer is not None and self.registry_timer.running:
            self.registry_timer.stop()
        self.registry_timer = None
        super().stop()

    def _kernel(self) -> dict:
        c = m.nfqueue_counters().get(self.router.cfg.queue)
        return {"dropped": c["dropped"], "user_dropped": c["user_dropped"]} if c else {}

    def _registrations(self) -> dict:
        out = {}
        for ident, r in self.router.core.registry.by_sender.items():
            out[ident] = (_ntoa(r.instance.address), tuple(sorted({rec.name for rec in r.records.values()})))
        return out

    def _registry_check(self) -> None:
        """A line per registration that appeared, moved, changed or ended: looked at
        whenever the registry's version moved (every change of the table bumps it)."""
        try:
            version = self.router.core.registry.version
            if version != self.version:
                self.version = version
                self.registration_lines()
        except Exception:
            log.exception("registry check")

    def tick(self, now: float) -> None:
        d = self.prompt.take()
        total, reasons, text = _by_reason(d, "refused_")
        if total:
            event(log_router, logging.WARNING, "registrations_refused",
                  "refused %d registration-plane message(s) in the last %.0f s: %s", total, self.tick_every,
                  text, count=total, reasons=reasons)
        self.registration_lines()

    def registration_lines(self) -> None:
        d = self.registry_deltas.take()
        now_regs = self._registrations()
        old = self.registrations
        self.registrations = now_regs
        for ident, (address, names) in now_regs.items():
            sender = ident[1]
            was = old.get(ident)
            if was is None:
                event(log_router, logging.INFO, "registered", "registered: %s at %s offers %s",
                      sender, address, ", ".join(names), sender=sender, address=address, services=list(names))
            elif was[0] != address:
                event(log_router, logging.INFO, "registration_moved", "registration moved: %s now at %s (was %s)",
                      sender, address, was[0], sender=sender, address=address, previous=was[0])
            elif was[1] != names:
                event(log_router, logging.INFO, "registration_changed", "%s at %s now offers %s (was %s)",
                      sender, address, ", ".join(names) or "nothing", ", ".join(was[1]) or "nothing",
                      sender=sender, address=address, services=list(names), previous=list(was[1]))
        gone = [ident for ident in old if ident not in now_regs]
        if gone:
            expired, unregistered = d.get("registrations_expired", 0), d.get("unregistrations", 0)
            reason = ("expired" if expired and not unregistered else "unregistered" if unregistered and not expired
                      else "withdrawn" if not expired else "expired or unregistered")
            for ident in gone:
                address, names = old[ident]
                event(log_router, logging.WARNING if reason == "expired" else logging.INFO, "registration_ended",
                      "registration ended: %s at %s (%s)%s", ident[1], address, reason,
                      ": no refresh within its hold time" if reason == "expired" else "",
                      sender=ident[1], address=address, reason=reason, services=list(names))

    def summarize(self, now: float, seconds: float) -> None:
        d = self.periodic.take()
        span = round(seconds)
        dropped, reasons, text = _by_reason(d, "dropped_")
        parts = _counts(d, {"syn_forwarded": "forwarded", "syn_delayed": "delayed", "syn_released": "released"})
        if dropped:
            parts.append(f"{dropped} dropped ({text})")
        if parts:
            live = len(self.router.core.registry.by_sender)
            event(log_router, logging.INFO, "syns_summary", "syns: %s in the last %d s; %d registration(s) live",
                  ", ".join(parts), span, live, seconds=span, forwarded=d.get("syn_forwarded", 0),
                  delayed=d.get("syn_delayed", 0), dropped=dropped, reasons=reasons, registrations=live)
        full, user = d.get("kernel dropped", 0), d.get("kernel user_dropped", 0)
        if full > 0 or user > 0:
            event(log_router, logging.WARNING, "kernel_queue_drops",
                  "kernel queue %d dropped %d packet(s) in the last %d s (queue full %d, socket buffer full %d)",
                  self.router.cfg.queue, full + user, span, full, user, queue=self.router.cfg.queue,
                  queue_full=full, socket_full=user, seconds=span)

    def collect(self) -> list:
        p, core, cfg = self.prefix, self.router.core, self.router.cfg
        s = _Used(core.stats)
        fams = super().collect()
        info = GaugeFamily(f"{p}_info", "Always 1; the labels say which router this is", labels=["instance", "address"])
        info.add_metric([cfg.instance, cfg.address or ""], 1)
        fams.append(info)
        for key, name, help_text in (
                ("syn_forwarded", "syns_forwarded", "SAL SYNs forwarded to an instance (repeats included)"),
                ("syn_repeated_same_instance", "syns_repeated", "Repeated SYNs sent where their first copy went"),
                ("syn_delayed", "syns_delayed", "SYNs held by a DELAY rule"),
                ("syn_released", "syns_released", "Held SYNs forwarded once a registration made them routable")):
            fams.append(CounterFamily(f"{p}_{name}_total", help_text, value=s(key)))
        fams.append(GaugeFamily(f"{p}_syns_held", "SYNs held by DELAY rules now", value=len(core.held)))
        drops = CounterFamily(f"{p}_dropped_packets_total",
                              "Packets dropped, by reason (not_a_syn: data never passes through a router)",
                              labels=["reason"])
        refused = CounterFamily(f"{p}_registrations_refused_total",
                                "Registration-plane messages refused, by reason (unknown_key, bad_mac, malformed, "
                                "replay, stale, not_owner...)", labels=["reason"])
        control = CounterFamily(f"{p}_control_messages_total",
                                "Authenticated registration-plane messages accepted, by type", labels=["type"])
        for key in sorted(s):
            for prefix, fam in (("dropped_", drops), ("refused_", refused), ("control_", control)):
                if key.startswith(prefix):
                    fam.add_metric([key[len(prefix):]], s(key))
        fams += [drops, refused, control]
        events = CounterFamily(f"{p}_registration_events_total",
                               "Registration changes: new, moved (new instance address), refreshed, unregistered, "
                               "expired (no refresh within the hold time)", labels=["event"])
        for key, name in REGISTRY_EVENTS.items():
            events.add_metric([name], core.registry.stats.get(key, 0))
        fams += [events, GaugeFamily(f"{p}_registrations", "Registrations held (one per registering gateway)",
                                     value=len(core.registry.by_sender))]
        instances = GaugeFamily(f"{p}_instances", "Live instances of each registered service", labels=["service"])
        per: Counter = Counter()
        for row in core.names():
            per[f"{row['name']}:{row['port']}" if row["port"] is not None else row["name"]] += row["instances"]
        for service, n in sorted(per.items()):
            instances.add_metric([service], n)
        per_service = CounterFamily(f"{p}_service_syns_total",
                                    "SYNs per service, by outcome (forwarded, delayed, dropped_by_rule, "
                                    "dropped_delay_full)", labels=["service", "outcome"])
        for key, v in sorted(core.service_counters().items()):
            service, _, outcome = key.rpartition(" ")
            per_service.add_metric([service, outcome], v)
        fams += [instances, per_service,
                 CounterFamily(f"{p}_internal_errors_total", "Packets or datagrams whose handling raised",
                               value=s("internal_errors"))]
        fams += m.nfqueue_families(p, {cfg.queue: "syn"})
        fams.append(self.leftovers(s, s.used))
        return fams


# --- the resolver -----------------------------------------------------------------------------
DNS_RESULTS = ("zone", "cache", "upstream", "servfail", "refused", "formerr", "notimp", "badvers",
               "rate_limited", "dropped")


class DnsObserver(Observer):
    prefix = "serval_dns"

    def __init__(self, daemon, **kwargs):
        super().__init__(daemon.reactor, getattr(daemon.cfg, "metrics", None), **kwargs)
        self.daemon = daemon
        self.periodic = Deltas(lambda: daemon.core.stats)

    def summarize(self, now: float, seconds: float) -> None:
        d = self.periodic.take()
        if d.get("queries", 0) <= 0:
            return
        keys = {f"{r}_answers" if r in ("zone", "cache", "upstream") else r: r.replace("_", " ") for r in DNS_RESULTS}
        span = round(seconds)
        event(log_dns, logging.INFO, "queries_summary", "queries: %d in the last %d s (%s)", d["queries"], span,
              ", ".join(f"{word} {d[k]}" for k, word in keys.items() if d.get(k)), queries=d["queries"],
              seconds=span, results={word: d[k] for k, word in keys.items() if d.get(k)})

    def collect(self) -> list:
        p, dmn = self.prefix, self.daemon
        s = _Used(dmn.core.stats)
        fams = super().collect()
        fams.append(CounterFamily(f"{p}_queries_total", "DNS queries received (UDP and TCP)", value=s("queries")))
        results = CounterFamily(f"{p}_query_results_total",
                                "Queries by result: zone (answered from a service zone), cache, upstream "
                                "(forwarded and answered), servfail, refused, formerr, notimp, badvers, "
                                "rate_limited (over the client's rate: answered truncated, so it asks again over "
                                "TCP, or dropped in a flood) and dropped (not answered)", labels=["result"])
        for r in DNS_RESULTS:
            results.add_metric([r], s(f"{r}_answers" if r in ("zone", "cache", "upstream") else r))
        fams.append(results)
        for key, help_text in (("forwarded", "Questions sent upstream (once for identical questions in flight)"),
                               ("coalesced", "Queries that joined an identical question already upstream"),
                               ("truncated", "Answers truncated to fit (TC set)"),
                               ("internal_errors", "Messages whose handling raised")):
            fams.append(CounterFamily(f"{p}_{key}_total", help_text, value=s(key)))
        fwd = dmn.forwarder.stats
        attempts = CounterFamily(f"{p}_upstream_attempts_total", "Attempts at an upstream, by transport",
                                 labels=["transport"])
        attempts.add_metric(["udp"], fwd.get("udp_attempts", 0))
        attempts.add_metric(["tcp"], fwd.get("tcp_attempts", 0))
        failures = CounterFamily(f"{p}_upstream_failures_total",
                                 "Failed upstream attempts, by reason (all_failed: every upstream failed a question)",
                                 labels=["reason"])
        for key, reason in (("timeouts", "timeout"), ("refused", "refused"), ("bad_rcode", "bad_rcode"),
                            ("mismatched", "mismatched"), ("all_failed", "all_failed")):
            failures.add_metric([reason], fwd.get(key, 0))
        up = GaugeFamily(f"{p}_upstream_up", "1 unless the upstream failed within retry_down_after",
                         labels=["upstream"])
        now = dmn.reactor.seconds()
        for u in dmn.forwarder.upstreams:
            up.add_metric([str(u)], int(u.down_until <= now))
        fams += [attempts, failures, up,
                 GaugeFamily(f"{p}_mappings", "Names with a virtual address", value=len(dmn.allocator.by_name)),
                 GaugeFamily(f"{p}_cache_entries", "Answers in the cache", value=len(dmn.cache)),
                 GaugeFamily(f"{p}_upstream_pending", "Questions waiting for an upstream", value=len(dmn.core.pending))]
        fams.append(self.leftovers(s, s.used))
        return fams
