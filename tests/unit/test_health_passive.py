"""Backend health learnt from live traffic (gateway/health.py): passive outcomes beside
rare probes, a passive-only kind with ejection, and the config that chooses them."""
import pytest

from gateway.health import HealthCheck


def test_live_traffic_puts_probes_off_and_a_failure_calls_one_at_once():
    h = HealthCheck(interval=30.0, fall=2)
    h.started(0.0)
    assert h.result(True) is True
    assert h.passive(True, 20.0) is None
    assert not h.due(31.0) and h.due(50.0)          # the flow at 20 s was the probe
    assert h.passive(False, 40.0, "refused a connection") is None
    assert h.due(40.0)                              # one refusal: a probe now, not in 10 s
    assert h.passive(False, 40.1, "refused a connection") is False and h.state == "down"
    assert (h.passive_ok, h.passive_failed, h.last_error) == (1, 2, "refused a connection")


def test_before_the_first_probe_live_traffic_decides_nothing():
    h = HealthCheck(interval=1.0)
    assert h.passive(True, 0.0) is None and h.passive(False, 0.1) is None
    assert h.state == "unknown"


def test_passive_only_never_probes_and_ejects_for_a_doubling_time():
    h = HealthCheck(interval=1.0, fall=2, kind="none", eject_time=10.0)
    assert h.state == "up" and not h.due(0.0) and not h.due(100.0)
    assert h.passive(False, 1.0) is None and h.passive(False, 1.1) is False
    assert h.tick(5.0) is None and h.state == "down"
    assert h.passive(True, 6.0) is None and h.state == "down"      # back by time only
    assert h.tick(11.1) is True and h.state == "up"
    h.passive(False, 12.0), h.passive(False, 12.1)                  # fails again at once:
    assert h.tick(31.0) is None and h.tick(32.1) is True            # twice as long out
    assert h.passive(True, 33.0) is None and h.ejections == 0       # a success: back to 10 s
    h.passive(False, 34.0), h.passive(False, 34.1)
    assert h.tick(44.1) is True


def test_a_success_between_failures_keeps_a_passive_backend_in():
    h = HealthCheck(interval=1.0, fall=2, kind="none")
    assert [h.passive(ok, 0.0) for ok in (False, True, False, True)] == [None] * 4
    assert h.state == "up"


# --- config --------------------------------------------------------------------------------

BASE = {"gateway": {"sal_address": "198.19.30.1"},
        "service": [{"name": "web.svc.example", "port": 80, "backend": "198.19.3.2:8080"},
                    {"name": "ssh.svc.example", "port": 22, "backend": "198.19.3.3:22"}],
        "routing": {"routers": ["198.19.20.1"], "key": "ab" * 32,
                    "health": {"interval": 5, "kind": "tcp",
                               "ssh.svc.example": {"kind": "none", "eject_time": 60}}}}


def test_health_kind_and_interval_per_service():
    from gateway.config import parse
    health = parse(BASE, "server.toml", "server").routing.health
    web, ssh = health.for_service("web.svc.example"), health.for_service("ssh.svc.example")
    assert (web.kind, web.interval) == ("tcp", 5.0)
    assert (ssh.kind, ssh.interval, ssh.eject_time) == ("none", 5.0, 60.0)   # the rest inherited


@pytest.mark.parametrize("health, words", [
    ({"kind": "http"}, "kind must be one of"),
    ({"nosuch.svc.example": {"kind": "none"}}, "no [[service]] named 'nosuch.svc.example'"),
    ({"ssh.svc.example": {"intervall": 3}}, "unknown key 'intervall'"),
    ({"eject_time": 0}, "positive number"),
])
def test_bad_health_settings_are_refused(health, words):
    from gateway.config import ConfigError, parse
    data = {**BASE, "routing": {**BASE["routing"], "health": health}}
    with pytest.raises(ConfigError, match="routing") as exc:
        parse(data, "server.toml", "server")
    assert words in str(exc.value)
