"""ServiceIDs: 256-bit opaque names, matched by longest prefix.

Text forms accepted by :func:`parse_service_id`:

* 64 hex digits (the reference stack's printed form);
* a small decimal number: that value in the first 32-bit word, big-endian, rest zero
  (the reference tools' shorthand; the captures use 16385);
* ``name:port`` (e.g. ``web.svc.example:80``): derived with :func:`service_id_for`.

Derivation from a name: the first 224 bits are SHA-256 of ``"serval:" + lowercased
name`` (without a trailing dot), then 16 zero bits, then the port in 16 bits. Every port
of a name therefore shares the prefix ``<id>:224``, and a single rule can cover a host's
services.
"""
import hashlib

SERVICE_ID_LEN = 32
SERVICE_ID_BITS = 256
NAME_PREFIX_BITS = 224


class ServiceIDError(ValueError):
    pass


def service_id_for(name: str, port: int = 0) -> bytes:
    name = name.strip().rstrip(".").lower()
    if not name:
        raise ServiceIDError("empty service name")
    if not 0 <= port <= 0xFFFF:
        raise ServiceIDError(f"port {port} out of range")
    digest = hashlib.sha256(b"serval:" + name.encode()).digest()
    return digest[:28] + b"\0\0" + port.to_bytes(2, "big")


def parse_service_id(text: str) -> bytes:
    text = text.strip()
    if len(text) == 64:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    if text.isdigit():
        value = int(text)
        if value >= 1 << 32:
            raise ServiceIDError(f"decimal serviceID {text} does not fit in 32 bits")
        return value.to_bytes(4, "big") + bytes(28)
    if ":" in text:
        name, _, port = text.rpartition(":")
        if port.isdigit() and name and not all(c in "0123456789abcdefABCDEF" for c in name):
            return service_id_for(name, int(port))
    raise ServiceIDError(
        f"not a serviceID: {text!r} (want 64 hex digits, a decimal number, or name:port)"
    )


def format_service_id(sid: bytes) -> str:
    return sid.hex()


def short(sid: bytes) -> str:
    """Compact form for logs and tables: the reference's decimal form when it applies."""
    if sid[4:] == bytes(28):
        return str(int.from_bytes(sid[:4], "big"))
    return sid.hex()[:16] + "…"


class ServicePrefix:
    """A serviceID prefix ``ID:bits``; bits beyond the prefix are zeroed."""

    __slots__ = ("value", "bits")

    def __init__(self, value: bytes, bits: int = SERVICE_ID_BITS):
        if len(value) != SERVICE_ID_LEN:
            raise ServiceIDError("a serviceID is 32 bytes")
        if not 0 <= bits <= SERVICE_ID_BITS:
            raise ServiceIDError(f"prefix length {bits} out of range 0..256")
        self.bits = bits
        self.value = _mask(int.from_bytes(value, "big"), bits)

    @classmethod
    def parse(cls, text: str) -> "ServicePrefix":
        text = text.strip()
        body, sep, bits = text.rpartition(":")
        if sep and bits.isdigit() and (len(body) == 64 or body.isdigit() or ":" in body):
            return cls(parse_service_id(body), int(bits))
        return cls(parse_service_id(text))

    def matches(self, sid: bytes) -> bool:
        return _mask(int.from_bytes(sid, "big"), self.bits) == self.value

    def __eq__(self, other):
        return isinstance(other, ServicePrefix) and (self.value, self.bits) == (other.value, other.bits)

    def __hash__(self):
        return hash((self.value, self.bits))

    def __str__(self):
        return f"{self.value.to_bytes(32, 'big').hex()}:{self.bits}"

    __repr__ = __str__


def _mask(value: int, bits: int) -> int:
    return value >> (SERVICE_ID_BITS - bits) << (SERVICE_ID_BITS - bits) if bits else 0
