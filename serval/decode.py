"""``serval decode``: print the SAL packets in pcap files, one line each, and check them.

Reads SAL directly over IPv4 (protocol 144) and inside UDP (either port 54324 or 54325).
Decoding is the protocol core's (``sal.wire``, ``sal.ip``); this module only formats.
"""
import argparse
import os
import struct
import sys
from dataclasses import dataclass

from gateway.translate.carriage import UDP_PORT_CLIENT, UDP_PORT_SERVER, ZERO_ADDR
from sal import wire
from sal.ip import IPv4, PROTO_TCP, PROTO_UDP, TCP, ntoa, tcp_flag_names, transport_checksum_ok
from sal.pcap import PcapError, read_pcap

UDP_PORTS = (UDP_PORT_CLIENT, UDP_PORT_SERVER)
_UDP = struct.Struct("!HHHH")

EPILOG = """\
One line per packet: index, seconds since the file's first packet, carriage (ip or
udp:SPORT>DPORT), addresses, flowIDs src>dst, CONTROL flags with verno, ackno and nonce,
serviceID (decimal when it is one, else 64 hex digits), SOURCE addresses, the transport
(TCP flags, seq/ack, ports, payload length; UDP ports and length) and checksum verdicts.
Packets that are not SAL get a short line and are not counted.

Summary: packets = SAL packets seen; sal_checksum_ok = SAL header checksums that verify;
transport_checksum_ok = transports whose checksum verifies, plus those with nothing to
verify: control-only packets (no transport) and UDP checksum 0 ("none", RFC 768). Inside
UDP carriage the inner checksum uses all-zero addresses in its pseudo-header, and the
outer UDP checksum must verify too. A transport of unknown protocol is left unchecked
(not counted ok, not a failure).

Exit status: 0 all fine; 1 a packet was malformed or failed a checksum; 2 a file is
missing or not a pcap.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("files", nargs="+", metavar="FILE.pcap", help="classic pcap files")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the summary line")


@dataclass(slots=True)
class Result:
    """One packet's line and verdicts. ``transport``: ok, none, bad or unchecked."""
    text: str
    sal: bool = False
    malformed: bool = False
    sal_ok: bool = False
    transport: str = "unchecked"


def decode_packet(ip: bytes | None) -> Result:
    if ip is None or len(ip) < 20 or ip[0] >> 4 != 4:
        return Result("not IPv4")
    ihl, proto = (ip[0] & 15) * 4, ip[9]
    addrs = f"{ntoa(ip[12:16])} > {ntoa(ip[16:20])}"
    ports = _UDP.unpack_from(ip, ihl)[:2] if len(ip) >= ihl + 8 and proto in (PROTO_TCP, PROTO_UDP) else None
    if proto == wire.PROTO_SAL:
        carriage = "ip"
    elif proto == PROTO_UDP and ports and set(ports) & set(UDP_PORTS):
        carriage = "udp:%d>%d" % ports
    else:
        where = f" ports {ports[0]}>{ports[1]}" if ports else ""
        return Result(f"not SAL: {addrs} proto {proto}{where} len {len(ip)}")
    try:
        return _decode_sal(ip, carriage)
    except wire.MalformedPacket as exc:
        return Result(f"{carriage} {addrs} MALFORMED {exc}", sal=True, malformed=True)


def _decode_sal(ip: bytes, carriage: str) -> Result:
    h = IPv4(ip)
    if h.is_fragment:
        raise wire.MalformedPacket("ip_fragment", "fragments are not reassembled")
    pos, end = h.ihl, h.total_length
    src, dst = h.src, h.dst           # pseudo-header addresses of the transport
    outer = None
    if carriage != "ip":
        ulen, ucsum = _UDP.unpack_from(ip, pos)[2:]
        if ulen < 8 or pos + ulen > end:
            raise wire.MalformedPacket("udp_bad_length", f"UDP length {ulen}")
        end = pos + ulen
        outer = _verdict(ucsum == 0, transport_checksum_ok(h.src, h.dst, PROTO_UDP, ip[pos:end]))
        pos += 8
        src = dst = ZERO_ADDR
    hdr, tpos = wire.decode(ip[:end], pos)
    tname, ttext, tverdict = _transport(hdr.protocol, ip[tpos:end], src, dst)
    sums = f"sal={'ok' if hdr.checksum_ok else 'bad'} {tname}={tverdict}"
    if outer is not None:
        sums += f" outer_udp={outer}"
        if outer == "bad" or tverdict == "bad":
            tverdict = "bad"
    text = (f"{carriage} {ntoa(h.src)} > {ntoa(h.dst)} {hdr.src_flow:08x}>{hdr.dst_flow:08x} "
            f"{_sal_text(hdr)} | {ttext} | {sums}")
    return Result(text, sal=True, sal_ok=hdr.checksum_ok, transport=tverdict)


def _verdict(absent: bool, ok: bool) -> str:
    return "none" if absent else "ok" if ok else "bad"


def _transport(proto: int, seg: bytes, src: bytes, dst: bytes) -> tuple[str, str, str]:
    """(name, summary, checksum verdict) of the transport segment after the SAL."""
    if not seg:
        return "transport", "no transport", "none"
    if proto == PROTO_TCP:
        t = TCP(seg)
        text = (f"tcp {tcp_flag_names(t.flags)} seq={t.seq} ack={t.ack} ports={t.sport}>{t.dport} "
                f"len={len(seg) - t.offset}")
        return "tcp", text, _verdict(False, transport_checksum_ok(src, dst, PROTO_TCP, seg))
    if proto == PROTO_UDP:
        if len(seg) < 8:
            raise wire.MalformedPacket("udp_truncated", f"{len(seg)} bytes")
        sport, dport, ulen, csum = _UDP.unpack_from(seg)
        if ulen < 8 or ulen > len(seg):
            raise wire.MalformedPacket("udp_bad_length", f"UDP length {ulen}, {len(seg)} present")
        text = f"udp ports={sport}>{dport} len={ulen - 8}"
        return "udp", text, _verdict(csum == 0, transport_checksum_ok(src, dst, PROTO_UDP, seg[:ulen]))
    return "transport", f"proto {proto} len={len(seg)}", "unchecked"


def _sal_text(hdr: wire.SalHeader) -> str:
    ctl = hdr.control
    parts = [f"{wire.flag_names(ctl.flags)} verno={ctl.verno} ackno={ctl.ackno} nonce={ctl.nonce.hex()}"
             if ctl else "data"]
    services = [e for e in hdr.extensions if isinstance(e, wire.Service)]
    for name, svc in zip(("service", "src_service"), services):
        parts.append(f"{name}={_sid(svc.service_id)}")
    if hdr.source:
        parts.append("source=" + ",".join(ntoa(a) for a in hdr.source.addresses))
    for ext in hdr.extensions:
        if isinstance(ext, wire.OtherExtension):
            parts.append(f"ext{ext.type}[{len(ext.raw)}]")
    pads = sum(isinstance(e, wire.Pad) for e in hdr.extensions)
    if pads:
        parts.append(f"pad={pads}")
    return " ".join(parts)


def _sid(sid: bytes) -> str:
    """The reference's decimal shorthand when it applies, else all 64 hex digits."""
    return str(int.from_bytes(sid[:4], "big")) if sid[4:] == bytes(28) else sid.hex()


@dataclass(slots=True)
class Totals:
    packets: int = 0
    sal_ok: int = 0
    transport_ok: int = 0
    malformed: int = 0
    failed: int = 0

    def add(self, r: Result) -> None:
        if not r.sal:
            return
        self.packets += 1
        self.malformed += r.malformed
        self.sal_ok += r.sal_ok
        self.transport_ok += r.transport in ("ok", "none")
        self.failed += not r.malformed and (not r.sal_ok or r.transport == "bad")

    def __str__(self):
        return (f"packets={self.packets} sal_checksum_ok={self.sal_ok} "
                f"transport_checksum_ok={self.transport_ok} malformed={self.malformed}")


def run(args) -> int:
    try:
        return _run(args)
    except BrokenPipeError:               # e.g. piped into head: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _run(args) -> int:
    totals, file_errors = Totals(), 0
    for path in args.files:
        try:
            with open(path, "rb") as f:
                data = f.read()
            if len(args.files) > 1 and not args.quiet:
                print(f"# {path}")
            start = None
            for index, (ts, ip) in enumerate(read_pcap(data)):
                start = ts if start is None else start
                result = decode_packet(ip)
                totals.add(result)
                if not args.quiet:
                    print(f"{index:5d} {ts - start:+11.6f} {result.text}")
        except BrokenPipeError:
            raise
        except (OSError, PcapError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            print(f"serval decode: {path}: {reason}", file=sys.stderr)
            file_errors += 1
    print(totals)
    if file_errors:
        return 2
    return 1 if totals.malformed or totals.failed else 0
