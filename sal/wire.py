"""The SAL header codec: base header and extensions, byte-compatible with the reference.

Layout (see docs/protocol.md): source flowID, destination flowID, header length in
32-bit words, transport protocol, checksum over the SAL header alone; then extensions,
each ``type<<4, length`` except PAD (one zero byte).
"""
import struct
from dataclasses import dataclass, field

from .checksum import checksum

PROTO_SAL = 144
BASE_LEN = 12
MAX_EXTENSIONS = 10

EXT_PAD, EXT_CONTROL, EXT_SERVICE, EXT_ADDRESS, EXT_SOURCE = 0, 1, 2, 3, 4

# CONTROL flags
SYN, RSYN, ACK, NACK, RST, FIN = 0x80, 0x40, 0x20, 0x10, 0x08, 0x04
_FLAG_NAMES = ((SYN, "SYN"), (RSYN, "RSYN"), (ACK, "ACK"), (NACK, "NACK"), (RST, "RST"), (FIN, "FIN"))

_BASE = struct.Struct("!IIBBH")
_CONTROL = struct.Struct("!BBBBII8s")


class MalformedPacket(ValueError):
    """A packet that cannot be decoded; ``reason`` is a short counter name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def flag_names(flags: int) -> str:
    return "|".join(name for bit, name in _FLAG_NAMES if flags & bit) or "-"


@dataclass(slots=True)
class Control:
    flags: int
    verno: int
    ackno: int
    nonce: bytes
    reserved: int = 0

    def encode(self) -> bytes:
        return _CONTROL.pack(EXT_CONTROL << 4, 20, self.flags, self.reserved,
                             self.verno, self.ackno, self.nonce)


@dataclass(slots=True)
class Service:
    service_id: bytes
    reserved: int = 0

    def encode(self) -> bytes:
        return bytes((EXT_SERVICE << 4, 36)) + self.reserved.to_bytes(2, "big") + self.service_id


@dataclass(slots=True)
class Source:
    addresses: list  # 4-byte IPv4 addresses: original source first, then each hop

    def encode(self) -> bytes:
        return bytes((EXT_SOURCE << 4, 4 + 4 * len(self.addresses), 0, 0)) + b"".join(self.addresses)


@dataclass(slots=True)
class Pad:
    def encode(self) -> bytes:
        return b"\0"


@dataclass(slots=True)
class OtherExtension:
    """An extension we carry but do not interpret (ADDRESS, or a future type)."""
    type: int
    raw: bytes

    def encode(self) -> bytes:
        return self.raw


@dataclass(slots=True)
class SalHeader:
    src_flow: int
    dst_flow: int
    protocol: int = 6
    extensions: list = field(default_factory=list)
    checksum: int = 0          # as read from the wire; ``encode`` recomputes it
    checksum_ok: bool = True   # as read from the wire

    @property
    def control(self) -> Control | None:
        for ext in self.extensions:
            if isinstance(ext, Control):
                return ext
        return None

    @property
    def service(self) -> Service | None:
        """The first SERVICE extension: the destination serviceID."""
        for ext in self.extensions:
            if isinstance(ext, Service):
                return ext
        return None

    @property
    def source(self) -> Source | None:
        for ext in self.extensions:
            if isinstance(ext, Source):
                return ext
        return None

    @property
    def flags(self) -> int:
        ctl = self.control
        return ctl.flags if ctl else 0

    def encode(self) -> bytes:
        ext = b"".join(e.encode() for e in self.extensions)
        if len(ext) % 4:
            raise ValueError("SAL extensions must add up to whole 32-bit words (add Pad)")
        words = (BASE_LEN + len(ext)) // 4
        head = _BASE.pack(self.src_flow, self.dst_flow, words, self.protocol, 0) + ext
        csum = checksum(head)
        return head[:10] + csum.to_bytes(2, "big") + head[12:]


def decode(buf: bytes, offset: int = 0) -> tuple[SalHeader, int]:
    """Decode the SAL header at ``offset``; returns it and the offset of the transport."""
    if len(buf) - offset < BASE_LEN:
        raise MalformedPacket("sal_truncated", f"{len(buf) - offset} bytes, base header is 12")
    src, dst, words, proto, csum = _BASE.unpack_from(buf, offset)
    hlen = words * 4
    if hlen < BASE_LEN:
        raise MalformedPacket("sal_bad_length", f"header length {words} words")
    end = offset + hlen
    if end > len(buf):
        raise MalformedPacket("sal_truncated", f"header claims {hlen} bytes, {len(buf) - offset} present")
    head = buf[offset:end]
    ok = checksum(head[:10] + b"\0\0" + head[12:]) == csum
    hdr = SalHeader(src, dst, proto, _decode_extensions(buf, offset + BASE_LEN, end), csum, ok)
    return hdr, end


def _decode_extensions(buf: bytes, pos: int, end: int) -> list:
    exts = []
    while pos < end:
        if len(exts) >= MAX_EXTENSIONS:
            raise MalformedPacket("sal_too_many_extensions", f"more than {MAX_EXTENSIONS}")
        kind = buf[pos] >> 4
        if kind == EXT_PAD:
            exts.append(Pad())
            pos += 1
            continue
        if pos + 2 > end:
            raise MalformedPacket("sal_bad_extension", "extension header past the SAL header")
        length = buf[pos + 1]
        if length < 2 or pos + length > end:
            raise MalformedPacket("sal_bad_extension", f"type {kind} length {length}")
        raw = bytes(buf[pos:pos + length])
        exts.append(_decode_one(kind, raw))
        pos += length
    return exts


def _decode_one(kind: int, raw: bytes):
    if kind == EXT_CONTROL:
        if len(raw) != 20:
            raise MalformedPacket("sal_bad_extension", f"CONTROL of {len(raw)} bytes")
        _, _, flags, reserved, verno, ackno, nonce = _CONTROL.unpack(raw)
        return Control(flags, verno, ackno, nonce, reserved)
    if kind == EXT_SERVICE:
        if len(raw) != 36:
            raise MalformedPacket("sal_bad_extension", f"SERVICE of {len(raw)} bytes")
        return Service(raw[4:], int.from_bytes(raw[2:4], "big"))
    if kind == EXT_SOURCE:
        if (len(raw) - 4) % 4 or len(raw) < 8:
            raise MalformedPacket("sal_bad_extension", f"SOURCE of {len(raw)} bytes")
        return Source([raw[i:i + 4] for i in range(4, len(raw), 4)])
    return OtherExtension(kind, raw)


def base_header(src_flow: int, dst_flow: int, protocol: int = 6) -> bytes:
    """A 12-byte SAL header with no extensions (data and pure ACK segments)."""
    head = _BASE.pack(src_flow, dst_flow, 3, protocol, 0)
    return head[:10] + checksum(head).to_bytes(2, "big")
