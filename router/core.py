"""The service router, sans-IO: registrations in, SAL SYNs in, forwarded SYNs out.

``on_control(datagram, now, wall_ns)`` takes a registration-plane message and returns the
reply to send (or None: refused messages are never answered). ``on_packet(pkt, now)``
takes a SAL packet addressed to the router and returns the verdict: the rewritten SYN
(to accept in its place), None (drop) or PASS. DELAY holds a SYN and releases it into
``outbox`` when a registration makes it routable, or drops it after ``delay_hold``.
``handle_timer(now)`` expires registrations, held SYNs and affinity entries.

The choice of instance is the service table's (longest prefix, top priority, weighted
random; or, for a service with client affinity, rendezvous hashing on the client: the
SYN's SAL source, i.e. the first address of SOURCE or else the IP source — the client
gateway, not the legacy host behind it). A SYN that cannot be forwarded (no service, the
DELAY queue full, no room for SOURCE) is answered at once with an ICMP host unreachable
quoting it (router/refusal.py), rate-limited. A retransmitted SYN (same client address
and flowID) goes to the instance the first one went to while that instance stays
registered, so a slow SYN-ACK never makes two instances accept one connection.
"""
import random
from collections import Counter, OrderedDict, defaultdict
from dataclasses import dataclass

from sal import registration as reg
from sal import wire
from sal.ip import IPv4, PROTO_UDP, aton, ntoa
from sal.serviceid import ServicePrefix, short
from sal.service_table import Action, ServiceTable
from sal.wire import MalformedPacket

from .refusal import TokenBucket, host_unreachable
from .registry import Instance, Registry
from .rewrite import forward_syn, with_source

PASS = object()        # verdict: not ours, accept unchanged
SAL_UDP_PORT = 54325   # the UDP carriage's server-side port: what client gateways send to


@dataclass
class RouterOptions:
    address: bytes | None = None   # our SAL address, added as a hop to an existing SOURCE
    udp_port: int = SAL_UDP_PORT
    affinity: float = 3.0          # seconds a repeated SYN sticks to the first choice
    delay_hold: float = 2.0        # seconds a SYN may wait on a DELAY rule
    max_held: int = 1024
    warmup: float = 0.5            # after start, probes are answered "not ready" this long
    min_hold: float = 0.05         # clamp of the hold time registrants ask for
    max_hold: float = 120.0
    replay_window: float = 30.0
    icmp_rate: float = 1000.0      # ICMP unreachables per second (a token bucket) ...
    icmp_burst: int = 50           # ... and at most this many at once, as Linux's defaults


@dataclass
class Held:
    pkt: bytes
    ip: IPv4
    sal_at: int
    sal_len: int
    hdr: wire.SalHeader
    deadline: float


class RouterCore:
    def __init__(self, name: str, keys, options: RouterOptions | None = None, now: float = 0.0,
                 rng: random.Random | None = None):
        self.name = name
        self.options = options or RouterOptions()
        self.stats: Counter = Counter()
        self.table = ServiceTable(rng)
        self.registry = Registry(self.table, self.options.min_hold, self.options.max_hold)
        self.verifier = reg.Verifier(keys, self.stats, int(self.options.replay_window * 1e9))
        self.clock = reg.SeqClock()
        self.started = now
        self.rule_names: dict[ServicePrefix, str] = {}
        self.service_stats: dict[ServicePrefix, Counter] = defaultdict(Counter)
        self.affinity: OrderedDict = OrderedDict()   # (client, flowID) -> (Target, expires)
        self.held: dict[tuple, Held] = {}
        self.outbox: list[bytes] = []
        self.icmp_bucket = TokenBucket(self.options.icmp_rate, self.options.icmp_burst, now)

    def add_rule(self, prefix: ServicePrefix, action: Action, next_hop: str | None = None,
                 priority: int = 1, weight: int = 1, name: str = "") -> None:
        """A static rule from the config: FORWARD to a fixed next hop, DROP or DELAY."""
        target = Instance("rule", aton(next_hop)) if action == Action.FORWARD else None
        self.table.add(prefix, action, target, priority, weight)
        if name:
            self.rule_names[prefix] = name

    def set_affinity(self, prefix: ServicePrefix, affinity) -> None:
        """Client affinity (sal.affinity.Affinity, or None) for the services under ``prefix``."""
        self.table.set_affinity(prefix, affinity)

    # --- registration plane --------------------------------------------------------
    def on_control(self, data: bytes, now: float, wall_ns: int) -> bytes | None:
        try:
            msg, key = self.verifier.check(data, wall_ns)
        except reg.Refused:
            return None
        self.stats[f"control_{msg.type_name}"] += 1
        if msg.type == reg.PROBE:
            ready = now - self.started >= self.options.warmup
            return self._reply(reg.PROBE_ACK, msg, key, int(ready), wall_ns)
        if msg.type == reg.REGISTER:
            if not all(reg.owns(key, r) for r in msg.records):
                self.stats["refused_not_owner"] += 1
                return self._reply(reg.ACK, msg, key, 1, wall_ns)
            version = self.registry.version
            self.registry.register(msg, now)
            if self.registry.version != version:
                self._release(now)
            return self._reply(reg.ACK, msg, key, 0, wall_ns)
        if msg.type == reg.UNREGISTER:
            self.registry.unregister(msg)
            return self._reply(reg.ACK, msg, key, 0, wall_ns)
        self.stats["refused_unexpected_type"] += 1
        return None

    def _reply(self, kind: int, msg: reg.Message, key: reg.Key, status: int, wall_ns: int) -> bytes:
        reply = reg.Message(kind, self.clock.next(wall_ns), key.key_id, self.name,
                            acked_seq=msg.seq, status=status)
        return reg.encode(reply, key.secret)

    # --- data plane: SYNs only ---------------------------------------------------------
    def on_packet(self, pkt: bytes, now: float):
        try:
            ip = IPv4(pkt)
            if len(pkt) != ip.total_length:
                return self._drop("truncated_copy")
            if ip.is_fragment:
                return self._drop("fragment")
            sal_at = ip.ihl
            if ip.protocol == PROTO_UDP:
                if len(pkt) < ip.ihl + 8 or int.from_bytes(pkt[ip.ihl + 2:ip.ihl + 4], "big") != self.options.udp_port:
                    return PASS
                sal_at += 8
            elif ip.protocol != wire.PROTO_SAL:
                return PASS
            hdr, end = wire.decode(pkt, sal_at)
        except MalformedPacket as exc:
            return self._drop(exc.reason)
        if not hdr.checksum_ok:
            return self._drop("sal_bad_checksum")
        ctl = hdr.control
        # data never passes through a router: only a first SYN is ours to forward
        if ctl is None or ctl.flags & (wire.ACK | wire.RSYN) or not ctl.flags & wire.SYN or hdr.dst_flow:
            return self._drop("not_a_syn")
        if hdr.service is None:
            return self._drop("no_service_extension")
        return self._route(Held(pkt, ip, sal_at, end - sal_at, hdr, 0.0), now)

    def _drop(self, reason: str):
        self.stats[f"dropped_{reason}"] += 1
        return None

    def _refuse(self, syn: Held, reason: str, now: float):
        """Drop the SYN and tell its sender at once: ICMP host unreachable quoting it as it
        arrived (the client gateway matches the quote to its flow and resets its client)."""
        self.stats[f"dropped_{reason}"] += 1
        if self.icmp_bucket.take(now):
            self.outbox.append(host_unreachable(syn.pkt, syn.sal_at + syn.sal_len))
            self.stats[f"icmp_unreachable_{reason}"] += 1
        else:
            self.stats["icmp_rate_limited"] += 1
        return None

    def _route(self, syn: Held, now: float, released: bool = False):
        sid = syn.hdr.service.service_id
        entry = self.table.match(sid)
        if entry is None:
            return self._refuse(syn, "no_service", now)
        counters = self.service_stats[entry.prefix]
        key = (syn.ip.src, syn.hdr.src_flow)
        target = self._sticky(key, entry, now)
        if target is None:
            target = self.table.resolve(sid, _client(syn), now)
        if target.action == Action.DROP:
            counters["dropped_by_rule"] += 1
            return self._drop("by_rule")
        if target.action != Action.FORWARD:      # DELAY
            return self._hold(key, syn, now, counters) if not released else None
        instance: Instance = target.target
        try:
            head = with_source(syn.hdr, syn.ip.src, self.options.address)
        except ValueError:       # no room for SOURCE: the header's length or extensions at their limit
            self.held.pop(key, None)             # (a held SYN too: it never will have room)
            return self._refuse(syn, "no_room_for_source", now)
        self.affinity[key] = (target, now + self.options.affinity)
        self.affinity.move_to_end(key)
        counters["forwarded"] += 1
        self.stats["syn_forwarded"] += 1
        return forward_syn(syn.pkt, syn.ip.ihl, syn.sal_at, syn.sal_len, instance.address, head)

    def _sticky(self, key: tuple, entry, now: float):
        """The target a repeated SYN went to before, if still in the table."""
        found = self.affinity.get(key)
        if found is None:
            return None
        target, expires = found
        if expires <= now or not any(t is target for t in entry.targets):
            del self.affinity[key]
            return None
        target.hits += 1
        self.stats["syn_repeated_same_instance"] += 1
        return target

    def _hold(self, key: tuple, syn: Held, now: float, counters: Counter):
        earlier = self.held.get(key)
        if earlier is None and len(self.held) >= self.options.max_held:
            counters["dropped_delay_full"] += 1
            return self._refuse(syn, "delay_full", now)
        syn.deadline = earlier.deadline if earlier else now + self.options.delay_hold
        self.held[key] = syn
        counters["delayed"] += 1
        self.stats["syn_delayed"] += 1
        return None

    def _release(self, now: float) -> None:
        """A registration changed: SYNs held by DELAY that are now routable go out."""
        for key, syn in list(self.held.items()):
            out = self._route(syn, now, released=True)
            if out is not None:
                del self.held[key]
                self.outbox.append(out)
                self.stats["syn_released"] += 1

    # --- time ------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        times = [self.registry.next_expiry()] + [h.deadline for h in self.held.values()]
        times = [t for t in times if t is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        self.registry.expire(now)
        for key, syn in list(self.held.items()):
            if syn.deadline <= now:
                del self.held[key]
                self.stats["dropped_delay_expired"] += 1
        while self.affinity:
            key, (_, expires) = next(iter(self.affinity.items()))
            if expires > now:
                break
            del self.affinity[key]

    # --- views -----------------------------------------------------------------------
    def services(self, now: float) -> list[dict]:
        """One row per (service, target): what ``serval ctl services`` shows."""
        rows = []
        for entry in self.table.entries():
            policy = self.table.affinity(entry.prefix.value.to_bytes(32, "big"))
            for t in entry.targets:
                inst = t.target if isinstance(t.target, Instance) else None
                registration = self.registry.registration_of(inst) if inst and inst.sender != "rule" else None
                record = registration.records.get(entry.prefix) if registration else None
                rows.append({
                    "service": record.name if record else self.rule_names.get(entry.prefix, short(entry.prefix.value.to_bytes(32, "big"))),
                    "prefix_bits": entry.prefix.bits,
                    "action": t.action.value,
                    "instance": ntoa(inst.address) if inst else "-",
                    "sender": inst.sender if inst else "rule",
                    "weight": t.weight, "priority": t.priority,
                    "health": "registered" if registration else "rule",
                    "expires_ms": round((registration.expires - now) * 1000) if registration else None,
                    "conns": t.hits,
                    "affinity": f"client {policy[1].timeout:g}s" if policy else "none",
                })
        return rows

    def service_counters(self) -> dict:
        out = {}
        for prefix, counters in self.service_stats.items():
            name = self._name_of(prefix)
            for k, v in counters.items():
                out[f"{name} {k}"] = v
        return out

    def _name_of(self, prefix: ServicePrefix) -> str:
        for r in self.registry.by_sender.values():
            if prefix in r.records:
                return r.records[prefix].name
        return self.rule_names.get(prefix, str(prefix))

    def names(self) -> list[dict]:
        return self.registry.names()


def _client(syn: Held) -> bytes:
    """Who "the client" is for affinity at a router: the SYN's SAL source — the original
    source an earlier router put first in SOURCE, else the IP source (a client gateway)."""
    for ext in syn.hdr.extensions:
        if isinstance(ext, wire.Source) and ext.addresses:
            return ext.addresses[0]
    return syn.ip.src
