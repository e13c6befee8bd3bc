"""How a gateway starts when the fast path cannot: "auto" goes on without it (one log
line says why), "on" refuses to start."""
import logging

import pytest

from gateway.config import GatewayConfig
from gateway.daemon import start_fast_path
from gateway.fastpath import build
from tests.unit.test_translate import make_pair


def config(tmp_path, mode):
    return GatewayConfig(role="client", path="x.toml", instance="unit-fp", queue=0, fast_path=mode,
                         state_dir=str(tmp_path))


@pytest.fixture
def no_compiler(monkeypatch):
    def fail(state_dir=None):
        raise build.BuildError("clang is not installed (a test stand-in)")
    monkeypatch.setattr(build, "object_path", fail)


def test_auto_runs_without_it_and_says_why(tmp_path, no_compiler, caplog):
    client, _ = make_pair()
    caplog.set_level(logging.INFO, logger="serval")
    assert start_fast_path(config(tmp_path, "auto"), client, []) is None
    assert client.refresh is None
    lines = [r.getMessage() for r in caplog.records if "fast path" in r.getMessage()]
    if lines and "needs root" in lines[0]:
        pytest.skip("not root: the check stops before the build")
    assert lines == ["fast path unavailable, every packet goes through Python: "
                     "clang is not installed (a test stand-in)"]


def test_on_refuses_to_start(tmp_path, no_compiler):
    client, _ = make_pair()
    with pytest.raises(RuntimeError, match=r'fast_path = "on"'):
        start_fast_path(config(tmp_path, "on"), client, [])


def test_off_is_said_once(tmp_path, caplog):
    client, _ = make_pair()
    caplog.set_level(logging.INFO, logger="serval")
    assert start_fast_path(config(tmp_path, "off"), client, []) is None
    assert any("fast path off" in r.getMessage() for r in caplog.records)
