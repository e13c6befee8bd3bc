"""The packet translators: a client/server pair in memory, brought to some stage of a
connection, then fed a few packets (random, mutated real ones, or built with random SAL
headers, extensions and flowIDs, the flows' real ones included) and timer calls.

Properties after every step: nothing escapes; the verdict is bytes, None or PASS; every
packet emitted (verdict and outbox) is well-formed IPv4 whose length is its total
length and whose header checksum verifies, SAL output decodes with its SAL checksum
verified, TCP checksums verify whenever every input's did; a None verdict is counted
(a ``dropped_*`` counter, or a packet held during a move) unless the packet was a SAL
control packet consumed by its flow; flows, the tables keyed on them and the port pool
agree. At the end, a timer far in the future forgets every flow and returns every port.
"""
import random
import struct

from gateway.translate import PASS, Backend, ClientTranslator, ServerTranslator
from gateway.translate.carriage import UDP_PORT_CLIENT, UDP_PORT_SERVER, ip_header, make_carriage
from sal import wire
from sal.ip import IPv4, aton, transport_checksum, transport_checksum_ok
from sal.serviceid import ServicePrefix, service_id_for
from sal.service_table import Action, ServiceTable
from sal.wire import MalformedPacket

from .base import Target
from .codec import random_extension
from .common import Finding, check_legacy, check_sal, fix_ipv4, fix_sal, mutate, random_bytes, require

CLIENT, VIP, CGW, SGW, SGW_LAN, SERVER = (aton(a) for a in (
    "198.19.1.2", "198.18.0.10", "198.19.2.1", "198.19.2.2", "198.19.3.1", "198.19.3.2"))
CGW2, SGW2 = aton("198.19.2.11"), aton("198.19.2.12")     # addresses to move to
SID = service_id_for("web.svc.example", 80)
OTHER_SID = service_id_for("api.svc.example", 443)
PORT_RANGE = (10000, 10003)        # small, so that exhaustion is reachable
CPORT, CSEQ, SSEQ = 40000, 1000, 5000
SYN, ACK, FIN, RST, PSH = 0x02, 0x10, 0x01, 0x04, 0x08
STAGES = ("fresh", "syn", "synack", "established", "data", "closing")
OPS = ("c.legacy", "c.sal", "s.sal", "s.backend", "c.timer", "s.timer", "c.migrate", "s.migrate")


def tcp(src, sport, dst, dport, seq, ack=0, flags=ACK, payload=b"", opts=b"", ident=1,
        frag=0x4000, tos=0, ttl=64, valid=True) -> bytes:
    off = (20 + len(opts)) // 4
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, off << 4,
                      flags, 65535, 0, 0) + opts + payload
    csum = transport_checksum(src, dst, 6, seg, 16) ^ (0 if valid else 0x5A5A)
    seg = seg[:16] + csum.to_bytes(2, "big") + seg[18:]
    return ip_header(src, dst, 6, 20 + len(seg), ident, ttl, tos, frag) + seg


def make_pair(carriage: str, keep: bool):
    ctable = ServiceTable(random.Random(3))
    ctable.add(ServicePrefix(SID, 224), Action.FORWARD, "198.19.2.2")
    ctable.add(ServicePrefix(OTHER_SID), Action.DELAY)
    vmap = {(VIP, 80): SID, (VIP, 443): OTHER_SID, (VIP, 81): service_id_for("nowhere", 1)}
    client = ClientTranslator(CGW, lambda a, p: vmap.get((a, p)), ctable,
                              make_carriage(carriage, "client"), rng=random.Random(1))
    stable = ServiceTable(random.Random(4))
    stable.add(ServicePrefix(SID), Action.DEMUX, Backend(SERVER, 8080, SGW_LAN))
    server = ServerTranslator(stable, make_carriage(carriage, "server"), port_range=PORT_RANGE,
                              keep_client_address=keep, rng=random.Random(2))
    client.local_addresses = {CGW, CGW2}
    server.local_addresses = {SGW, SGW2}
    return client, server


def _run_stage(client, server, stage: str, keep: bool):
    """Bring a fresh pair to ``stage``; returns the packets each side saw (as seeds)."""
    seen = {op: [] for op in OPS}

    def feed(op, pkt, now=0.0):
        seen[op].append(pkt)
        side, what = op.split(".")
        t = client if side == "c" else server
        return {"legacy": t.from_legacy if side == "c" else None, "sal": t.from_sal,
                "backend": getattr(t, "from_backend", None)}[what](pkt, now)

    lport = None
    if stage == "fresh":
        return seen, lport
    syn = tcp(CLIENT, CPORT, VIP, 80, CSEQ, flags=SYN, opts=struct.pack("!BBH", 2, 4, 1460))
    sal_syn = feed("c.legacy", syn)
    if stage == "syn":
        seen["s.sal"].append(sal_syn)
        return seen, lport
    to_backend = feed("s.sal", sal_syn)
    lport = struct.unpack_from("!H", to_backend, 20)[0]
    legacy_dst = CGW if keep else SGW_LAN
    synack = tcp(SERVER, 8080, legacy_dst, lport, SSEQ, CSEQ + 1, SYN | ACK, opts=struct.pack("!BBH", 2, 4, 1460))
    sal_synack = feed("s.backend", synack)
    if stage == "synack":
        seen["c.sal"].append(sal_synack)
        return seen, lport
    feed("c.sal", sal_synack)
    feed("s.sal", feed("c.legacy", tcp(CLIENT, CPORT, VIP, 80, CSEQ + 1, SSEQ + 1, ACK)))
    if stage == "established":
        return seen, lport
    feed("s.sal", feed("c.legacy", tcp(CLIENT, CPORT, VIP, 80, CSEQ + 1, SSEQ + 1, ACK | PSH, b"GET /\r\n")))
    feed("c.sal", feed("s.backend", tcp(SERVER, 8080, legacy_dst, lport, SSEQ + 1, CSEQ + 8, ACK | PSH, b"x" * 100)))
    if stage == "data":
        return seen, lport
    feed("s.sal", feed("c.legacy", tcp(CLIENT, CPORT, VIP, 80, CSEQ + 8, SSEQ + 101, FIN | ACK)))
    feed("c.sal", feed("s.backend", tcp(SERVER, 8080, legacy_dst, lport, SSEQ + 101, CSEQ + 9, FIN | ACK)))
    for pkt in client.outbox:
        seen["s.sal"].append(pkt)
    for pkt in server.outbox:
        seen["c.sal"].append(pkt)
    return seen, lport


class Config:
    """One (carriage, keep_client_address, stage): its seeds and the flows' numbers,
    learnt once from a pair built the same way as every run's."""

    def __init__(self, carriage: str, keep: bool, stage: str):
        self.carriage, self.keep, self.stage = carriage, keep, stage
        client, server = make_pair(carriage, keep)
        self.seeds, self.lport = _run_stage(client, server, stage, keep)
        for op in OPS:
            self.seeds[op] = [p for p in self.seeds[op] if p]
        self.cflow = next(iter(client.flows.values()), None)
        self.sflow = next(iter(server.flows.values()), None)
        self.ids = [0, 1, 0xFFFFFFFF]
        self.nums = [0, 1, 0xFFFFFFFF]
        self.nonces = [bytes(8)]
        for f in (self.cflow, self.sflow):
            if f is not None:
                s = f.sal
                self.ids += [s.local_flow, s.remote_flow]
                self.nums += [s.snd_nxt, (s.snd_nxt - 1) & 0xFFFFFFFF, (s.snd_nxt + 1) & 0xFFFFFFFF,
                              s.rcv_nxt, (s.rcv_nxt - 1) & 0xFFFFFFFF, (s.rcv_nxt + 1) & 0xFFFFFFFF]
                self.nonces.append(s.local_nonce)
        if self.cflow is None:      # a SYN-stage pair: learn the client's flow from its SYN
            self.ids.append(random.Random(1).getrandbits(32))

    def build(self):
        client, server = make_pair(self.carriage, self.keep)
        _run_stage(client, server, self.stage, self.keep)
        client.outbox.clear()
        server.outbox.clear()
        return client, server


class Translate(Target):
    name = "translate"
    description = "ClientTranslator.from_legacy/from_sal, ServerTranslator.from_sal/from_backend, handle_timer, migrate"

    def __init__(self):
        self.configs = {}
        for carriage in ("ip", "udp"):
            for keep in (False, True):
                for stage in STAGES:
                    self.configs[(carriage, keep, stage)] = Config(carriage, keep, stage)
        self.all_seeds = [p for c in self.configs.values() for ps in c.seeds.values() for p in ps]

    # --- generation ----------------------------------------------------------------
    def generate(self, r):
        carriage = r.choice(("ip", "udp"))
        keep = r.random() < 0.25
        stage = r.choice(STAGES)
        cfg = self.configs[(carriage, keep, stage)]
        t = 0.0
        steps = []
        for _ in range(1 + r.randrange(4)):
            dt = r.random()
            t += 0.0 if dt < 0.3 else 0.01 if dt < 0.5 else 1.0 if dt < 0.7 else \
                r.choice((2.0, 3.0, 5.1, 60.0, 121.0, 7200.0, r.random() * 1e4))
            op = r.choice(OPS)
            if op.endswith("timer"):
                steps.append((op, None, t))
            elif op.endswith("migrate"):
                steps.append((op, r.choice((CGW2, SGW2, CGW, SGW, r.randbytes(4))), t))
            else:
                steps.append((op, self._packet(r, cfg, op), t))
        return carriage, keep, stage, steps

    def _packet(self, r, cfg: Config, op: str) -> bytes:
        k = r.random()
        seeds = cfg.seeds[op]
        if k < 0.08:
            return random_bytes(r, 80)
        if k < 0.45 and seeds:
            pkt = r.choice(seeds)
            return self._mutated(r, pkt, cfg) if r.random() < 0.8 else pkt
        if op in ("c.sal", "s.sal"):
            pkt = self._sal(r, cfg, op == "c.sal")
        else:
            pkt = self._legacy(r, cfg, op == "c.legacy")
        return self._mutated(r, pkt, cfg) if r.random() < 0.15 else pkt

    def _mutated(self, r, pkt: bytes, cfg: Config) -> bytes:
        pkt = mutate(pkt, r, self.all_seeds)
        if r.random() < 0.6:
            if len(pkt) >= 20 and pkt[0] >> 4 == 4:
                sal_at = (pkt[0] & 15) * 4 + (8 if cfg.carriage == "udp" else 0)
                if r.random() < 0.7:
                    pkt = fix_sal(pkt, sal_at)
                if len(pkt) > 24 and cfg.carriage == "udp" and r.random() < 0.7:
                    ihl = (pkt[0] & 15) * 4
                    pkt = pkt[:ihl + 4] + struct.pack("!H", max(0, len(pkt) - ihl) & 0xFFFF) + pkt[ihl + 6:]
            pkt = fix_ipv4(pkt)
        return pkt

    def _segment(self, r, cfg: Config, to_client_side: bool, sal: bool) -> tuple[bytes, int, int]:
        """Flags, seq, ack, options and payload of a TCP segment near the flow's numbers."""
        flags = r.choice((SYN, SYN | ACK, ACK, ACK | PSH, FIN | ACK, RST, RST | ACK, FIN, 0, r.getrandbits(8)))
        seqs = (CSEQ, CSEQ + 1, CSEQ + 8, CSEQ + 9, SSEQ, SSEQ + 1, SSEQ + 101, SSEQ + 102)
        seq = r.choice(seqs) if r.random() < 0.8 else r.getrandbits(32)
        ack = r.choice(seqs) if r.random() < 0.8 else r.getrandbits(32)
        opts = b""
        if r.random() < 0.4:
            choice = r.randrange(4)
            if choice == 0:
                opts = struct.pack("!BBH", 2, 4, r.choice((536, 1460, 9000, 65535, r.getrandbits(16))))
            elif choice == 1:     # MSS at an odd offset, after a NOP
                opts = b"\x01" + struct.pack("!BBH", 2, 4, r.choice((1460, 65535, r.getrandbits(16)))) + b"\x01\x01\x01"
            elif choice == 2:
                opts = b"\x01\x01\x08\x0a" + r.randbytes(8) + b"\x02\x04\x05\xb4"
            else:
                opts = r.randbytes(4 * r.randrange(1, 11))
        payload = r.randbytes(r.randrange(64)) if r.random() < 0.5 else b""
        if r.random() < 0.02:
            payload = r.randbytes(1400)
        return flags, seq, ack, opts, payload

    def _legacy(self, r, cfg: Config, client_side: bool) -> bytes:
        flags, seq, ack, opts, payload = self._segment(r, cfg, client_side, False)
        if client_side:
            src = CLIENT if r.random() < 0.9 else r.choice((r.randbytes(4), VIP, CGW))
            dst = VIP if r.random() < 0.9 else r.choice((r.randbytes(4), CGW))
            sport = CPORT if r.random() < 0.8 else r.choice((CPORT + 1, r.getrandbits(16)))
            dport = 80 if r.random() < 0.8 else r.choice((443, 81, 22, r.getrandbits(16)))
        else:
            src = SERVER if r.random() < 0.9 else r.randbytes(4)
            dst = (CGW if cfg.keep else SGW_LAN) if r.random() < 0.9 else r.randbytes(4)
            sport = 8080 if r.random() < 0.9 else r.getrandbits(16)
            lport = cfg.lport or PORT_RANGE[0]
            dport = lport if r.random() < 0.8 else r.choice((PORT_RANGE[0], PORT_RANGE[1], r.getrandbits(16)))
        bad_offset = r.random() < 0.05
        pkt = tcp(src, sport, dst, dport, seq, ack, flags, payload, opts,
                  ident=r.getrandbits(16), tos=r.getrandbits(8) if r.random() < 0.1 else 0,
                  frag=r.choice((0x4000, 0x4000, 0, 0x2000, 0x0001)) if r.random() < 0.1 else 0x4000,
                  valid=r.random() < 0.95)
        if bad_offset:        # a data offset past the segment's end
            pkt = pkt[:32] + bytes(((r.randrange(6, 16)) << 4,)) + pkt[33:]
            pkt = _fix_tcp(pkt)
        if r.random() < 0.05:     # IP options: the slow path
            pkt = _with_ip_options(pkt, r.randbytes(4 * r.randrange(1, 4)))
        return pkt

    def _sal(self, r, cfg: Config, to_client: bool) -> bytes:
        carriage = cfg.carriage
        if to_client:
            src, dst = (SGW, CGW)
        else:
            src, dst = (CGW, SGW)
        if r.random() < 0.15:
            src = r.choice((CGW2, SGW2, CGW, SGW, r.randbytes(4)))
        if r.random() < 0.1:
            dst = r.choice((CGW2, SGW2, CGW, SGW, r.randbytes(4)))
        ids = cfg.ids
        src_flow = r.choice(ids) if r.random() < 0.9 else r.getrandbits(32)
        dst_flow = r.choice(ids) if r.random() < 0.9 else r.getrandbits(32)
        exts = []
        if r.random() < 0.6:
            flags = r.choice((wire.SYN, wire.SYN | wire.ACK, wire.ACK, wire.FIN, wire.FIN | wire.ACK,
                              wire.RST, wire.RSYN, wire.RSYN | wire.ACK, wire.RST | wire.ACK, r.getrandbits(8)))
            verno = r.choice(cfg.nums) if r.random() < 0.9 else r.getrandbits(32)
            ackno = r.choice(cfg.nums) if r.random() < 0.9 else r.getrandbits(32)
            nonce = r.choice(cfg.nonces) if r.random() < 0.9 else r.randbytes(8)
            exts.append(wire.Control(flags, verno, ackno, nonce))
        if r.random() < 0.3:
            exts.append(wire.Service(SID if r.random() < 0.7 else r.choice((OTHER_SID, r.randbytes(32)))))
        if r.random() < 0.15:
            n = 1 if r.random() < 0.8 else r.randrange(1, 4)
            first = src if r.random() < 0.7 else r.randbytes(4)
            exts.append(wire.Source([first] + [r.randbytes(4) for _ in range(n - 1)]))
        if r.random() < 0.1:
            exts.append(random_extension(r))
        if r.random() < 0.2:
            r.shuffle(exts)
        size = sum(len(e.encode()) for e in exts)
        exts += [wire.Pad() for _ in range(-size % 4)]
        exts = exts[:wire.MAX_EXTENSIONS]
        hdr = wire.SalHeader(src_flow, dst_flow, 6 if r.random() < 0.97 else r.getrandbits(8), exts)
        try:
            head = hdr.encode()
        except ValueError:
            head = wire.base_header(src_flow, dst_flow)
        if r.random() < 0.03:
            head = head[:10] + bytes((head[10] ^ 0xFF,)) + head[11:]
        seg = b""
        if r.random() < 0.75:
            flags, seq, ack, opts, payload = self._segment(r, cfg, to_client, True)
            if r.random() < 0.05:
                opts = opts + bytes(-len(opts) % 4)
            ports = b"\0\0\0\0" if r.random() < 0.95 else r.randbytes(4)
            off = (20 + len(opts)) // 4
            if r.random() < 0.05:
                off = r.randrange(16)
            seg = ports + struct.pack("!IIBBHHH", seq, ack, off << 4, flags, 65535, 0, 0) + opts + payload
            pseudo = (src, dst) if carriage == "ip" else (bytes(4), bytes(4))
            csum = transport_checksum(*pseudo, 6, seg, 16) ^ (0 if r.random() < 0.95 else 1)
            seg = seg[:16] + csum.to_bytes(2, "big") + seg[18:]
        elif r.random() < 0.1:
            seg = r.randbytes(r.randrange(1, 24))
        body = head + seg
        ident = r.getrandbits(16)
        frag = 0x4000 if r.random() < 0.95 else r.choice((0, 0x2000, 0x0003))
        if carriage == "udp":
            sport = (UDP_PORT_SERVER if to_client else UDP_PORT_CLIENT) if r.random() < 0.9 else r.getrandbits(16)
            dport = (UDP_PORT_CLIENT if to_client else UDP_PORT_SERVER) if r.random() < 0.95 else r.getrandbits(16)
            udp = struct.pack("!HHHH", sport, dport, 8 + len(body), 0)
            csum = transport_checksum(src, dst, 17, udp + body, 6) if r.random() < 0.1 else 0
            udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
            return ip_header(src, dst, 17, 28 + len(body), ident, 64, 0, frag) + udp + body
        return ip_header(src, dst, wire.PROTO_SAL, 20 + len(body), ident, 64, 0, frag) + body

    # --- running -------------------------------------------------------------------
    def run(self, inp) -> None:
        carriage, keep, stage, steps = inp
        cfg = self.configs[(carriage, keep, stage)]
        client, server = cfg.build()
        valid = True          # every input so far had a TCP checksum that verifies
        for op, arg, now in steps:
            side, what = op.split(".")
            t = client if side == "c" else server
            before = _drops(t)
            if what == "timer":
                t.handle_timer(now)
                verdict = PASS
            elif what == "migrate":
                t.migrate(now, arg)
                verdict = PASS
            else:
                valid = valid and _input_valid(arg, carriage, what == "sal")
                fn = {"legacy": getattr(t, "from_legacy", None), "sal": t.from_sal,
                      "backend": getattr(t, "from_backend", None)}[what]
                if fn is None:
                    continue
                verdict = fn(arg, now)
            require(verdict is None or verdict is PASS or type(verdict) is bytes,
                    f"{op} gave a verdict of type {type(verdict).__name__}")
            if type(verdict) is bytes:
                sal_out = (side, what) in (("c", "legacy"), ("s", "backend"))
                if sal_out:
                    check_sal(verdict, carriage, valid)
                else:
                    check_legacy(verdict, valid)
            if verdict is None and what in ("legacy", "sal", "backend"):
                require(_drops(t) > before or (what == "sal" and _control_only(arg, carriage)),
                        f"{op} dropped a packet without counting it")
            for pkt in (client.outbox + server.outbox):
                if len(pkt) >= 20 and pkt[9] == 6:
                    check_legacy(pkt, True)          # RSTs we make ourselves: always valid
                else:
                    check_sal(pkt, carriage, valid)
            client.outbox.clear()
            server.outbox.clear()
            _check_tables(client, server)
            require(t.next_deadline() is None or isinstance(t.next_deadline(), float),
                    "next_deadline is not a time")
        # far in the future everything is forgotten, every port given back
        end = (steps[-1][2] if steps else 0.0) + 1e7
        for t in (client, server):
            for far in (end, end + 1e7, end + 2e7):    # held packets released at the first
                t.handle_timer(far)
            require(not t.flows, f"{t.role}: flows left after every timeout")
        require(not client.by_legacy and not server.by_backend and not server.by_peer, "tables not emptied")
        for pool in server.pools.values():
            require(len(pool.free) == PORT_RANGE[1] - PORT_RANGE[0] + 1, "a port was never given back")
            require(len(set(pool.free)) == len(pool.free), "a port was given back twice")


def _drops(t) -> int:
    return sum(v for k, v in t.stats.items()
               if k.startswith(("dropped_", "refused_")) or k == "packets_held")


def _check_tables(client, server) -> None:
    live = set(map(id, client.flows.values()))
    require(all(id(f) in live for f in client.by_legacy.values()), "client by_legacy holds a forgotten flow")
    live = set(map(id, server.flows.values()))
    require(all(id(f) in live for f in server.by_backend.values()), "server by_backend holds a forgotten flow")
    require(all(id(f) in live for f in server.by_peer.values()), "server by_peer holds a forgotten flow")
    # a closed flow lingers on a pair given back at once (its backend socket is gone)
    used = {f.extra[2] for f in server.by_backend.values() if f.closed_at is None}
    for pool in server.pools.values():
        require(not used & set(pool.free), "a port in use is also free")
        require(len(set(pool.free)) == len(pool.free), "a port is free twice")


def _split_sal(pkt: bytes, carriage: str):
    ip = IPv4(pkt)
    at = ip.ihl + (8 if carriage == "udp" else 0)
    hdr, off = wire.decode(pkt[:ip.total_length], at)
    return ip, hdr, pkt[off:ip.total_length]


def _control_only(pkt: bytes, carriage: str) -> bool:
    try:
        _, hdr, seg = _split_sal(pkt, carriage)
    except (MalformedPacket, IndexError):
        return False
    return hdr.control is not None and not seg


def _input_valid(pkt: bytes, carriage: str, sal: bool) -> bool:
    """Whether the packet's TCP checksum verifies (whatever it is, the output must then)."""
    try:
        if sal:
            ip, hdr, seg = _split_sal(pkt, carriage)
            if not seg:
                return True
            pseudo = (ip.src, ip.dst) if carriage == "ip" else (bytes(4), bytes(4))
            # ports are zero on the wire; the checksum's update assumes it
            return seg[:4] == b"\0\0\0\0" and transport_checksum_ok(*pseudo, 6, seg)
        ip = IPv4(pkt)
        if ip.protocol != 6:
            return True
        return transport_checksum_ok(ip.src, ip.dst, 6, pkt[ip.ihl:ip.total_length])
    except (MalformedPacket, IndexError):
        return False


def _fix_tcp(pkt: bytes) -> bytes:
    ihl = (pkt[0] & 15) * 4
    seg = pkt[ihl:]
    csum = transport_checksum(pkt[12:16], pkt[16:20], 6, seg, 16)
    return pkt[:ihl] + seg[:16] + csum.to_bytes(2, "big") + seg[18:]


def _with_ip_options(pkt: bytes, opts: bytes) -> bytes:
    head = bytearray(pkt[:20])
    head[0] = 0x40 | (20 + len(opts)) // 4
    return fix_ipv4(bytes(head) + opts + pkt[20:])


TARGETS = [Translate]
