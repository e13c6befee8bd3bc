"""Internet checksum (RFC 1071) and its incremental update (RFC 1624).

The one's-complement sum does not depend on byte order, so words are summed in the
machine's native order and the folded result is swapped once at the end.
"""
import sys
from array import array

_SWAP = sys.byteorder == "little"


def ones_sum(data: bytes) -> int:
    """One's-complement sum of ``data`` as big-endian 16-bit words, folded to 16 bits."""
    if len(data) & 1:
        data = bytes(data) + b"\0"
    words = array("H", data)
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    if _SWAP:
        total = ((total & 0xFF) << 8) | (total >> 8)
    return total


def fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def checksum(data: bytes, initial: int = 0) -> int:
    """The checksum field value for ``data`` (with its checksum field zeroed)."""
    return ~fold(ones_sum(data) + initial) & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int:
    """Sum of the IPv4 pseudo-header used by TCP and UDP checksums."""
    return fold(ones_sum(src + dst) + protocol + length)


def delta(old: bytes, new: bytes) -> int:
    """What adding ``new`` and removing ``old`` (same length) does to a sum.

    The result is added to a checksum with :func:`apply_delta`. Precomputing the delta
    of fields that never change within a flow (addresses, ports) makes the per-packet
    update a single addition.
    """
    return fold(ones_sum(new) + (~ones_sum(old) & 0xFFFF))


def apply_delta(csum: int, d: int) -> int:
    """RFC 1624 eqn. 3: HC' = ~(~HC + delta)."""
    return ~fold((~csum & 0xFFFF) + d) & 0xFFFF


def update16(csum: int, old: int, new: int) -> int:
    """Incremental update for one changed 16-bit word."""
    return ~fold((~csum & 0xFFFF) + (~old & 0xFFFF) + new) & 0xFFFF
