"""lab/impair_tc.c, the tests' damaged link, run on packets with BPF_PROG_TEST_RUN:
it must damage what it is told to, where it is told to (the TCP flags of plain and
SAL-carried TCP), and nothing else."""
import os
import struct

import pytest

from sal.ip import aton

ETH = b"\x02\0\0\0\0\x01\x02\0\0\0\0\x02\x08\x00"
TC_ACT_OK, TC_ACT_SHOT = 0, 2
SRC, DST = aton("198.19.2.1"), aton("198.19.5.2")


def ipv4(proto: int, body: bytes) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 1, 0x4000, 64, proto, 0, SRC, DST) + body


def tcp(flags: int = 0x10, payload: bytes = b"") -> bytes:
    return struct.pack("!HHIIBBHHH", 0, 0, 1000, 2000, 0x50, flags, 65535, 0x1234, 0) + payload


def sal(body: bytes, words: int = 3) -> bytes:
    return struct.pack("!IIBBH", 0x11111111, 0x22222222, words, 6, 0xABCD) + bytes(4 * (words - 3)) + body


def udp(body: bytes) -> bytes:
    return struct.pack("!HHHH", 54324, 54325, 8 + len(body), 0) + body


@pytest.fixture(scope="module")
def damage():
    if os.geteuid() != 0:
        pytest.skip("needs root (loading BPF programs)")
    from gateway.fastpath.libbpf import BpfError
    from lab.impair import Damage
    d = Damage(None, "unused")
    try:
        prog = d.load()
    except (BpfError, RuntimeError) as exc:
        pytest.skip(f"the damage program cannot be loaded here: {exc}")
    d.prog = prog
    yield d
    d.stop()


def run(damage, packet: bytes) -> tuple[int, bytes]:
    from gateway.fastpath.libbpf import test_run
    verdict, out = test_run(damage.prog, ETH + packet)
    assert out[:14] == ETH
    return verdict, out[14:]


def flipped_bits(a: bytes, b: bytes) -> list[int]:
    assert len(a) == len(b)
    return [i * 8 + bit for i, (x, y) in enumerate(zip(a, b)) for bit in range(8) if (x ^ y) >> bit & 1]


@pytest.mark.parametrize("carriage", ["tcp", "sal", "sal-extensions", "udp"])
def test_flags_set_on_the_tcp_header_of_each_carriage(damage, carriage):
    segment = tcp(0x10, b"data" * 100)
    packet = {"tcp": lambda: ipv4(6, segment), "sal": lambda: ipv4(144, sal(segment)),
              "sal-extensions": lambda: ipv4(144, sal(segment, words=8)),
              "udp": lambda: ipv4(17, udp(sal(segment)))}[carriage]()
    flags_at = len(packet) - len(segment) + 13
    damage.set(corrupt=1.0, flag_share=1.0)
    before = damage.counters()
    verdict, out = run(damage, packet)
    assert verdict == TC_ACT_OK
    assert out[flags_at] == 0x14                        # ACK|RST
    assert out[:flags_at] + out[flags_at + 1:] == packet[:flags_at] + packet[flags_at + 1:]
    after = damage.counters()
    assert after["flagged"] - before["flagged"] == 1 and after["corrupted"] - before["corrupted"] == 1


@pytest.mark.parametrize("packet", [ipv4(144, sal(b"", words=8)), ipv4(1, b"\x08\0" + bytes(30)),
                                    ipv4(6, tcp(0x14))],
                         ids=["sal-control-only", "icmp", "rst-already"])
def test_without_flags_to_set_one_bit_after_the_ip_header_flips(damage, packet):
    damage.set(corrupt=1.0, flag_share=1.0)
    for _ in range(20):
        verdict, out = run(damage, packet)
        assert verdict == TC_ACT_OK
        (bit,) = flipped_bits(packet, out)
        assert bit >= 20 * 8                            # never the IP header


def test_drop_and_nothing_by_default(damage):
    packet = ipv4(6, tcp(0x10, b"x" * 100))
    damage.set(drop=1.0)
    before = damage.counters()
    assert run(damage, packet)[0] == TC_ACT_SHOT
    assert damage.counters()["dropped"] - before["dropped"] == 1
    damage.set()
    for _ in range(50):
        assert run(damage, packet) == (TC_ACT_OK, packet)


def test_rates_are_fractions():
    from lab.impair import _rate
    assert _rate(0) == 0 and _rate(1.0) == 2 ** 32 - 1 and _rate(0.5) == 2 ** 31
    with pytest.raises(ValueError):
        _rate(1.5)
