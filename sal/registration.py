"""The registration control plane: messages between gateways and service routers.

Bytes in, objects out; no I/O, time is an argument. Every message is authenticated
with HMAC-SHA256 under a key the deployment shares (or one key per owner), named by a
key id in the message. Layout (big-endian; docs/routing.md has the table):

    magic "SR" | version 1 | type | seq (8) | key id (1+n) | sender (1+n) | body | HMAC (32)

``seq`` is the sender's wall clock in nanoseconds, forced strictly increasing: a
receiver refuses a message whose seq is not above the last one it accepted from that
(key id, sender), or is further than a window from its own clock. The first rule stops
replays while the receiver runs; the second stops replays of old messages after it
restarted (it has forgotten the last seq) — clocks must agree within the window.

Types: REGISTER (the sender's complete current set of services at one instance
address, with a hold time after which the receiver forgets them), UNREGISTER (some, or
with none listed all, of them), ACK (a router applied a REGISTER/UNREGISTER), PROBE
and PROBE_ACK (a client gateway asks whether a router is alive and ready).
"""
import fnmatch
import hashlib
import hmac
import struct
from dataclasses import dataclass, field

from .serviceid import NAME_PREFIX_BITS, SERVICE_ID_LEN, ServicePrefix, service_id_for

MAGIC = b"SR"
VERSION = 1
REGISTER, UNREGISTER, ACK, PROBE, PROBE_ACK = 1, 2, 3, 4, 5
TYPE_NAMES = {REGISTER: "register", UNREGISTER: "unregister", ACK: "ack", PROBE: "probe",
              PROBE_ACK: "probe_ack"}
MAC_LEN = 32
MAX_RECORDS = 255
DEFAULT_PORT = 54326               # routers listen here (next to the SAL UDP ports)
DEFAULT_WINDOW_NS = 30 * 10**9

_HEAD = struct.Struct("!2sBBQ")
_RECORD = struct.Struct("!H32sHHB")   # prefix bits, prefix, weight, priority, name length


class Refused(ValueError):
    """A message that must be ignored; ``reason`` is a short counter name."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Record:
    """One service offered at an instance."""
    name: str
    prefix: ServicePrefix
    weight: int = 1
    priority: int = 1


@dataclass(slots=True)
class Message:
    type: int
    seq: int
    key_id: str
    sender: str
    address: bytes = b"\0\0\0\0"   # REGISTER, UNREGISTER: the instance's SAL address
    hold_ms: int = 0               # REGISTER: forget it this long after the last refresh
    records: list = field(default_factory=list)
    acked_seq: int = 0             # ACK, PROBE_ACK: the seq answered
    status: int = 0                # ACK: 0 applied, else refused; PROBE_ACK: 1 ready, 0 warming up

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.type, str(self.type))


def _short_text(text: str, limit: int, what: str) -> bytes:
    raw = text.encode()
    if not 0 < len(raw) <= limit:
        raise ValueError(f"{what} must be 1..{limit} bytes, not {len(raw)}")
    return bytes((len(raw),)) + raw


def encode(msg: Message, key: bytes) -> bytes:
    out = bytearray(_HEAD.pack(MAGIC, VERSION, msg.type, msg.seq))
    out += _short_text(msg.key_id, 32, "key id") + _short_text(msg.sender, 64, "sender")
    if msg.type in (REGISTER, UNREGISTER):
        out += msg.address
        if msg.type == REGISTER:
            out += msg.hold_ms.to_bytes(4, "big")
        if len(msg.records) > MAX_RECORDS:
            raise ValueError(f"at most {MAX_RECORDS} services in one message")
        out.append(len(msg.records))
        for r in msg.records:
            name = r.name.encode()
            out += _RECORD.pack(r.prefix.bits, r.prefix.value.to_bytes(32, "big"), r.weight,
                                r.priority, len(name)) + name
    elif msg.type in (ACK, PROBE_ACK):
        out += msg.acked_seq.to_bytes(8, "big") + bytes((msg.status,))
    return bytes(out) + hmac.new(key, out, hashlib.sha256).digest()


def peek_key_id(data: bytes) -> str:
    """The key id of a message, before its MAC is checked (to pick the key)."""
    if len(data) < _HEAD.size + 2 + MAC_LEN or data[:2] != MAGIC:
        raise Refused("malformed")
    if data[2] != VERSION:
        raise Refused("bad_version")
    n = data[_HEAD.size]
    return data[_HEAD.size + 1:_HEAD.size + 1 + n].decode("ascii", "replace")


def decode(data: bytes, key: bytes) -> Message:
    """Check the MAC with ``key``, then parse. Raises Refused."""
    peek_key_id(data)
    body, mac = data[:-MAC_LEN], data[-MAC_LEN:]
    if not hmac.compare_digest(hmac.new(key, body, hashlib.sha256).digest(), mac):
        raise Refused("bad_mac")
    try:
        return _parse(body)
    except (IndexError, struct.error, UnicodeDecodeError, ValueError):
        raise Refused("malformed") from None


def _parse(body: bytes) -> Message:
    _, _, kind, seq = _HEAD.unpack_from(body)
    pos = _HEAD.size
    key_id, pos = _text(body, pos)
    sender, pos = _text(body, pos)
    msg = Message(kind, seq, key_id, sender)
    if kind in (REGISTER, UNREGISTER):
        msg.address = body[pos:pos + 4]
        pos += 4
        if kind == REGISTER:
            msg.hold_ms = int.from_bytes(body[pos:pos + 4], "big")
            pos += 4
        count = body[pos]
        pos += 1
        for _ in range(count):
            bits, value, weight, priority, n = _RECORD.unpack_from(body, pos)
            pos += _RECORD.size
            name = body[pos:pos + n].decode()
            pos += n
            if bits > 256 or weight < 1 or len(name) != n:
                raise ValueError("bad record")
            msg.records.append(Record(name, ServicePrefix(value, bits), weight, priority))
    elif kind in (ACK, PROBE_ACK):
        msg.acked_seq = int.from_bytes(body[pos:pos + 8], "big")
        msg.status = body[pos + 8]
        pos += 9
    elif kind != PROBE:
        raise ValueError("unknown type")
    if pos != len(body) or len(msg.address) != 4:
        raise ValueError("length")
    return msg


def _text(buf: bytes, pos: int) -> tuple[str, int]:
    n = buf[pos]
    raw = buf[pos + 1:pos + 1 + n]
    if len(raw) != n or n == 0:
        raise ValueError("short text")
    return raw.decode(), pos + 1 + n


# --- keys, signing and checking -------------------------------------------------------

@dataclass(frozen=True)
class Key:
    """A secret and what it may register: service names matching one of ``names``
    (shell patterns). A key limited to some names may only register serviceIDs derived
    from those names (see :func:`owns`)."""
    key_id: str
    secret: bytes
    names: tuple = ("*",)

    @property
    def unrestricted(self) -> bool:
        return "*" in self.names


def owns(key: Key, record: Record) -> bool:
    if key.unrestricted:
        return True
    if not any(fnmatch.fnmatchcase(record.name.lower(), p.lower()) for p in key.names):
        return False
    # the prefix must lie inside the name's own 224-bit prefix: a key for "web.*"
    # cannot claim the serviceID of another name by registering it under a name it owns
    named = ServicePrefix(service_id_for(record.name), NAME_PREFIX_BITS)
    return record.prefix.bits >= NAME_PREFIX_BITS and named.matches(record.prefix.value.to_bytes(SERVICE_ID_LEN, "big"))


class SeqClock:
    """Sequence numbers for one sender: its wall clock in ns, strictly increasing."""

    def __init__(self):
        self.last = 0

    def next(self, wall_ns: int) -> int:
        self.last = max(self.last + 1, wall_ns)
        return self.last


class Signer:
    """What a sender needs: its key, its name and its sequence clock."""

    def __init__(self, key: Key, sender: str):
        self.key = key
        self.sender = sender
        self.clock = SeqClock()

    def message(self, kind: int, wall_ns: int, **fields) -> tuple[bytes, Message]:
        msg = Message(kind, self.clock.next(wall_ns), self.key.key_id, self.sender, **fields)
        return encode(msg, self.key.secret), msg

    def check_reply(self, data: bytes) -> Message:
        """A router's reply (ACK, PROBE_ACK) under our key; the caller matches acked_seq
        against what it sent, which makes a replayed reply useless."""
        msg = decode(data, self.key.secret)
        if msg.type not in (ACK, PROBE_ACK):
            raise Refused("unexpected_type")
        return msg


class Verifier:
    """A receiver's checks: known key, MAC, seq window, and seq above the last accepted
    from the same (key id, sender). Refusals are counted by reason in ``stats``."""

    def __init__(self, keys, stats, window_ns: int = DEFAULT_WINDOW_NS):
        self.keys = {k.key_id: k for k in keys}
        self.stats = stats
        self.window_ns = window_ns
        self.last_seq: dict[tuple, int] = {}

    def check(self, data: bytes, wall_ns: int) -> tuple[Message, Key]:
        try:
            key = self.keys.get(peek_key_id(data))
            if key is None:
                raise Refused("unknown_key")
            msg = decode(data, key.secret)
            if abs(msg.seq - wall_ns) > self.window_ns:
                raise Refused("stale")
            ident = (msg.key_id, msg.sender)
            if msg.seq <= self.last_seq.get(ident, 0):
                raise Refused("replay")
            self.last_seq[ident] = msg.seq
            return msg, key
        except Refused as exc:
            self.stats[f"refused_{exc.reason}"] += 1
            raise


def parse_key(text: str) -> bytes:
    """A key as written in a config or key file: hex, at least 16 bytes."""
    try:
        secret = bytes.fromhex(text.strip())
    except ValueError:
        raise ValueError("a key is written in hex (e.g. `openssl rand -hex 32`)") from None
    if len(secret) < 16:
        raise ValueError(f"a key needs at least 16 bytes (32 hex digits), not {len(secret)}")
    return secret
