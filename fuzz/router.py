"""The service router's core: registrations (signed, random records) and SAL SYNs
(random SAL headers and extensions, long SOURCE lists, mutated real SYNs) to rewrite.

Properties: nothing escapes; on_packet gives bytes, None or PASS; a None is counted
(``dropped_*`` or a held SYN); a forwarded SYN is well-formed IPv4 to a registered
instance, keeps its IP source, its SAL header verifies and carries SOURCE naming the
original source first, its transport checksum verifies whenever the input's did, and
over UDP the UDP length (and checksum, when set) is right; on_control answers None or
an ACK/PROBE_ACK under our key for the message's seq.
"""
import random
import struct

from router.core import PASS, RouterCore, RouterOptions
from sal import registration as reg
from sal import wire
from sal.ip import IPv4, aton, transport_checksum, transport_checksum_ok
from sal.serviceid import ServicePrefix, service_id_for
from sal.service_table import Action
from sal.wire import MalformedPacket

from .base import Target
from .codec import KEY, OTHER_KEY, random_extension, random_message
from .common import check_ipv4, fix_ipv4, fix_sal, mutate, random_bytes, require

ROUTER, CGW, SGW0, SGW1 = (aton(a) for a in ("198.19.20.1", "198.19.10.1", "198.19.30.1", "198.19.31.1"))
SID = service_id_for("web.svc.example", 80)
DELAYED = service_id_for("later.svc.example", 80)
DROPPED = service_id_for("never.svc.example", 80)
WALL = 1_800_000_000 * 10**9


def _register(sender: str, address: bytes, sid: bytes, seq: int) -> bytes:
    msg = reg.Message(reg.REGISTER, WALL + seq, "deployment", sender, address=address, hold_ms=5000,
                      records=[reg.Record("web.svc.example", ServicePrefix(sid), 1, 1)])
    return reg.encode(msg, KEY.secret)


def make_router(hop: bool) -> RouterCore:
    core = RouterCore("r0", [KEY, OTHER_KEY], RouterOptions(address=ROUTER if hop else None),
                      now=0.0, rng=random.Random(5))
    core.add_rule(ServicePrefix(DELAYED, 224), Action.DELAY)
    core.add_rule(ServicePrefix(DROPPED, 224), Action.DROP)
    core.add_rule(ServicePrefix(service_id_for("static.svc.example", 0), 224), Action.FORWARD, "198.19.40.1")
    core.on_control(_register("sgw0", SGW0, SID, 1), 0.0, WALL + 1)
    core.on_control(_register("sgw1", SGW1, SID, 2), 0.0, WALL + 2)
    return core


def sal_syn(r, carriage: str) -> bytes:
    src = CGW if r.random() < 0.9 else r.randbytes(4)
    dst = ROUTER
    exts = [wire.Control(r.choice((wire.SYN, wire.SYN, wire.SYN | wire.ACK, wire.RSYN, wire.ACK, r.getrandbits(8))),
                         r.getrandbits(32), 0, r.randbytes(8))] if r.random() < 0.95 else []
    if r.random() < 0.95:
        exts.append(wire.Service(r.choice((SID, SID, DELAYED, DROPPED, service_id_for("static.svc.example", 8),
                                           r.randbytes(32)))))
    k = r.random()
    if k < 0.2:
        n = r.choice((1, 2, 61, 62))
        exts.append(wire.Source([src] + [r.randbytes(4) for _ in range(n - 1)]))
    elif k < 0.35:     # big extensions: the header near its 1020-byte limit
        for _ in range(r.randrange(1, 5)):
            n = r.choice((252, 248, 200, 2 + r.randrange(250)))
            exts.append(wire.OtherExtension(7, bytes((0x70, n)) + r.randbytes(n - 2)))
    if r.random() < 0.1:
        exts.append(random_extension(r))
    if r.random() < 0.1:
        r.shuffle(exts)
    size = sum(len(e.encode()) for e in exts)
    exts += [wire.Pad() for _ in range(-size % 4)]
    exts = exts[:wire.MAX_EXTENSIONS]
    words = (12 + sum(len(e.encode()) for e in exts)) // 4
    try:
        head = wire.SalHeader(r.getrandbits(32), 0 if r.random() < 0.95 else r.getrandbits(32), 6, exts).encode()
    except (ValueError, struct.error):
        head = wire.base_header(1, 0)
    if words > 255 or len(head) % 4:
        head = wire.base_header(1, 0)
    seg = b""
    if r.random() < 0.9:
        opts = struct.pack("!BBH", 2, 4, 1460) if r.random() < 0.5 else b""
        seg = struct.pack("!HHIIBBHHH", 0, 0, r.getrandbits(32), 0, (20 + len(opts)) // 4 << 4, 0x02, 65535, 0, 0) \
            + opts + r.randbytes(r.randrange(8))
        pseudo = (src, dst) if carriage == "ip" else (bytes(4), bytes(4))
        csum = transport_checksum(*pseudo, 6, seg, 16)
        seg = seg[:16] + csum.to_bytes(2, "big") + seg[18:]
    body = head + seg
    from gateway.translate.carriage import ip_header
    if carriage == "udp":
        udp = struct.pack("!HHHH", 54324, 54325 if r.random() < 0.95 else r.getrandbits(16), 8 + len(body), 0)
        if r.random() < 0.3:
            udp = udp[:6] + struct.pack("!H", transport_checksum(src, dst, 17, udp + body, 6) or 0xFFFF)
        return ip_header(src, dst, 17, 28 + len(body), r.getrandbits(16), 64, 0, 0x4000) + udp + body
    return ip_header(src, dst, wire.PROTO_SAL, 20 + len(body), r.getrandbits(16), 64, 0, 0x4000) + body


class Router(Target):
    name = "router"
    description = "router.core.RouterCore on_packet (SYN rewrite), on_control, handle_timer"

    def __init__(self):
        r = random.Random(11)
        self.seeds = [sal_syn(r, c) for c in ("ip", "udp") for _ in range(16)]

    def generate(self, r):
        hop = r.random() < 0.5
        steps, t, seq = [], 0.0, 10
        for _ in range(1 + r.randrange(4)):
            t += r.choice((0.0, 0.01, 1.0, 3.5, 6.0))
            k = r.random()
            if k < 0.65:
                carriage = r.choice(("ip", "udp"))
                q = r.random()
                if q < 0.05:
                    pkt = random_bytes(r, 80)
                elif q < 0.35:
                    pkt = mutate(r.choice(self.seeds), r, self.seeds)
                    if r.random() < 0.6 and len(pkt) >= 20:
                        pkt = fix_ipv4(fix_sal(pkt, (pkt[0] & 15) * 4 + (8 if pkt[9] == 17 else 0)))
                else:
                    pkt = sal_syn(r, carriage)
                steps.append(("packet", pkt, t))
            elif k < 0.9:
                seq += 1 + r.randrange(3)
                key = KEY if r.random() < 0.8 else OTHER_KEY
                msg = random_message(r)
                msg.seq = WALL + seq if r.random() < 0.9 else msg.seq
                msg.key_id = key.key_id if r.random() < 0.95 else msg.key_id
                if r.random() < 0.5 and msg.type == reg.REGISTER:
                    msg.records = [reg.Record("web.svc.example", ServicePrefix(r.choice((SID, DELAYED))), 1 + r.randrange(3), 1)]
                try:
                    data = reg.encode(msg, key.secret)
                except ValueError:
                    data = random_bytes(r, 60)
                if r.random() < 0.2:
                    data = mutate(data, r)
                steps.append(("control", data, t))
            else:
                steps.append(("timer", None, t))
        return hop, steps

    def run(self, inp) -> None:
        hop, steps = inp
        core = make_router(hop)
        seq_wall = WALL
        for kind, arg, now in steps:
            if kind == "timer":
                core.handle_timer(now)
            elif kind == "control":
                reply = core.on_control(arg, now, seq_wall + int(now * 1e9) + 20)
                require(reply is None or type(reply) is bytes, "on_control reply is not bytes")
                if reply is not None:
                    sent = reg.decode(arg, KEY.secret if reg.peek_key_id(arg) == KEY.key_id else OTHER_KEY.secret)
                    key = KEY if sent.key_id == KEY.key_id else OTHER_KEY
                    got = reg.decode(reply, key.secret)
                    require(got.type in (reg.ACK, reg.PROBE_ACK) and got.acked_seq == sent.seq,
                            "reply does not answer the message")
            else:
                before = sum(v for k, v in core.stats.items() if k.startswith("dropped_")) + core.stats["syn_delayed"]
                verdict = core.on_packet(arg, now)
                require(verdict is None or verdict is PASS or type(verdict) is bytes,
                        f"on_packet verdict of type {type(verdict).__name__}")
                if verdict is None:
                    after = sum(v for k, v in core.stats.items() if k.startswith("dropped_")) + core.stats["syn_delayed"]
                    require(after > before, "on_packet dropped a SYN without counting it")
                elif verdict is not PASS:
                    _check_forwarded(arg, verdict, _instances(core))
            for pkt in core.outbox:
                check_ipv4(pkt)
            core.outbox.clear()
            require(core.next_deadline() is None or core.next_deadline() >= 0, "bad deadline")


def _instances(core) -> set:
    return {t.target.address for e in core.table.entries() for t in e.targets
            if t.action == Action.FORWARD}


def _check_forwarded(pkt: bytes, out: bytes, instances: set) -> None:
    ip_in = IPv4(pkt)
    ip = check_ipv4(out)
    require(ip.src == ip_in.src, "the router changed the IP source")
    require(ip.dst in instances, "forwarded to an address that is no instance")
    at = ip.ihl
    udp = ip.protocol == 17
    if udp:
        require(struct.unpack_from("!H", out, at + 4)[0] == len(out) - at, "UDP length not updated")
        if out[at + 6:at + 8] != b"\0\0":
            require(transport_checksum_ok(ip.src, ip.dst, 17, out[at:]), "UDP checksum does not verify")
        at += 8
    try:
        hdr, end = wire.decode(out, at)
        in_at = ip_in.ihl + (8 if udp else 0)
        hdr_in, end_in = wire.decode(pkt[:ip_in.total_length], in_at)
    except MalformedPacket as exc:
        raise AssertionError(f"forwarded SYN does not decode: {exc}") from None
    require(hdr.checksum_ok, "forwarded SAL checksum does not verify")
    src = hdr.source
    require(src is not None and src.addresses[0] == (hdr_in.source.addresses[0] if hdr_in.source else ip_in.src),
            "SOURCE does not name the original source first")
    seg_in, seg = pkt[end_in:ip_in.total_length], out[end:]
    require(seg[4:] == seg_in[4:] if udp else seg[:16] == seg_in[:16] and seg[18:] == seg_in[18:],
            "the transport changed beyond its checksum")
    if seg_in and len(seg_in) >= 20:
        pseudo_in = (ip_in.src, ip_in.dst) if not udp else (bytes(4), bytes(4))
        if transport_checksum_ok(*pseudo_in, 6, seg_in):
            pseudo = (ip.src, ip.dst) if not udp else (bytes(4), bytes(4))
            require(transport_checksum_ok(*pseudo, 6, seg), "forwarded transport checksum does not verify")


TARGETS = [Router]
