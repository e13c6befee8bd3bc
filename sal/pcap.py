"""A reader for classic pcap files (Ethernet, raw IP and Linux cooked captures)."""
import struct

_GLOBAL = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">",
           b"\x4d\x3c\xb2\xa1": "<", b"\xa1\xb2\x3c\x4d": ">"}  # µs and ns variants
LINKTYPE_ETHERNET, LINKTYPE_RAW, LINKTYPE_LINUX_SLL, LINKTYPE_IPV4 = 1, 101, 113, 228


class PcapError(ValueError):
    pass


def read_pcap(data: bytes):
    """Yield (timestamp, ip_packet_bytes or None) for each record; None for non-IPv4 frames."""
    if len(data) < 24 or data[:4] not in _GLOBAL:
        raise PcapError("not a pcap file (bad magic number; pcapng is not supported)")
    endian = _GLOBAL[data[:4]]
    nano = data[:4] in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    linktype = struct.unpack_from(endian + "I", data, 20)[0] & 0xFFFF
    record = struct.Struct(endian + "IIII")
    pos = 24
    while pos < len(data):
        if pos + 16 > len(data):
            raise PcapError(f"truncated record header at byte {pos}")
        sec, frac, caplen, _ = record.unpack_from(data, pos)
        pos += 16
        if pos + caplen > len(data):
            raise PcapError(f"truncated packet at byte {pos}")
        frame = data[pos:pos + caplen]
        pos += caplen
        yield sec + frac / (1e9 if nano else 1e6), _ip_of(frame, linktype)


def _ip_of(frame: bytes, linktype: int):
    if linktype == LINKTYPE_ETHERNET:
        off = 14
        ethertype = frame[12:14]
        while ethertype == b"\x81\x00" and len(frame) >= off + 4:  # VLAN tags
            ethertype = frame[off + 2:off + 4]
            off += 4
        return frame[off:] if ethertype == b"\x08\x00" else None
    if linktype == LINKTYPE_LINUX_SLL:
        return frame[16:] if frame[14:16] == b"\x08\x00" else None
    if linktype in (LINKTYPE_RAW, LINKTYPE_IPV4):
        return frame if frame and frame[0] >> 4 == 4 else None
    raise PcapError(f"unsupported link type {linktype}")
