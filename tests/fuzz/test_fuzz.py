"""Short, deterministic fuzz runs for CI: every target of fuzz/ under Hypothesis.

Each target is driven two ways: its structured generator fed by Hypothesis
(``st.randoms()``: the generator's choices become Hypothesis data, so a failure
shrinks), and raw bytes where a target takes bytes. ``derandomize=True`` makes a run
the same every time; a few seconds per target. The long runs are ``python -m fuzz.run``.
"""
import functools

import pytest

pytest.importorskip("hypothesis", reason="hypothesis is in the test extra: pip install -e '.[test]'")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fuzz.targets import TARGETS  # noqa: E402

SETTINGS = dict(derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))


@functools.lru_cache(maxsize=None)
def target(name):
    return TARGETS[name]()


def examples(name: str) -> int:
    return {"translate": 1500, "router": 1000, "dns": 1000}.get(name, 1000)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_structured(name):
    t = target(name)

    @settings(max_examples=examples(name), **SETTINGS)
    @given(st.randoms(use_true_random=False, note_method_calls=False))
    def run(r):
        t.run(t.generate(r))

    run()


@settings(max_examples=1000, **SETTINGS)
@given(st.binary(max_size=80), st.integers(0, 3))
def test_sal_decode_raw(data, offset):
    target("sal_wire").run((bytes(offset) + data, offset))


@settings(max_examples=1000, **SETTINGS)
@given(st.binary(max_size=80), st.integers(0, 40), st.integers(0, 0xFFFF))
def test_ip_tcp_raw(data, pos, mss):
    target("sal_ip").run((data, pos, mss))


@settings(max_examples=1000, **SETTINGS)
@given(st.binary(max_size=120))
def test_pcap_raw(data):
    target("sal_pcap").run(b"\xd4\xc3\xb2\xa1" + data)


@settings(max_examples=1000, **SETTINGS)
@given(st.binary(max_size=160), st.integers(0, 2**64))
def test_registration_raw(data, wall):
    target("sal_registration").run((b"SR\x01" + data, wall))


@settings(max_examples=500, **SETTINGS)
@given(st.sampled_from(["ip", "udp"]), st.sampled_from(["fresh", "syn", "synack", "established", "closing"]),
       st.sampled_from(["c.legacy", "c.sal", "s.sal", "s.backend"]), st.binary(max_size=120),
       st.floats(0, 1e5, allow_nan=False))
def test_translators_raw_bytes(carriage, stage, op, data, now):
    target("translate").run((carriage, False, stage, [(op, data, now)]))


@settings(max_examples=300, **SETTINGS)
@given(st.lists(st.tuples(st.sampled_from(["c.timer", "s.timer"]), st.none(),
                          st.floats(0, 1e6, allow_nan=False)), min_size=1, max_size=6),
       st.sampled_from(["syn", "synack", "established", "data", "closing"]))
def test_translator_timers_at_random_times(steps, stage):
    target("translate").run(("ip", False, stage, steps))


@settings(max_examples=500, **SETTINGS)
@given(st.binary(max_size=120), st.booleans())
def test_router_raw_bytes(data, hop):
    target("router").run((hop, [("packet", b"\x45" + data, 0.0), ("control", data, 0.1)]))


@settings(max_examples=500, **SETTINGS)
@given(st.binary(max_size=120), st.booleans())
def test_dns_raw_query(data, tcp):
    target("dns").run([("query", data, tcp, "198.19.1.2", 0.0)])
