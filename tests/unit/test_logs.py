"""Logs: the JSON formatter, event names for existing lines, the shared setup, and the
lines the observers derive from the cores' counters."""
import io
import json
import logging
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from serval import logs
from serval.logs import JsonFormatter, event
from serval.observe import GatewayObserver, RouterObserver

REPO = Path(__file__).resolve().parents[2]
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")


def record(logger: str, level: int, msg: str, *args, **extra) -> logging.LogRecord:
    rec = logging.getLogger(logger).makeRecord(logger, level, __file__, 1, msg, args, None, extra=extra or None)
    return rec


def test_json_line_has_the_five_fields_and_the_event_fields():
    rec = record("serval.flow", logging.INFO, "flow %s %s", "1a2b3c4d", "reset",
                 serval_event="flow_closed",
                 serval_fields={"flow": "1a2b3c4d", "reason": "reset", "bytes_out": 120, "message": "clash"})
    obj = json.loads(JsonFormatter().format(rec))
    assert TIME.match(obj["time"]), obj["time"]
    assert (obj["level"], obj["logger"], obj["message"], obj["event"]) == \
        ("info", "serval.flow", "flow 1a2b3c4d reset", "flow_closed")
    assert (obj["reason"], obj["bytes_out"]) == ("reset", 120)
    assert obj["field_message"] == "clash"          # a field never overwrites a reserved key
    assert list(obj)[:5] == ["time", "level", "logger", "message", "event"]


def test_json_line_of_a_plain_line_and_of_an_exception():
    obj = json.loads(JsonFormatter().format(record("serval.x", logging.WARNING, "caf\u00e9 %d%%", 5)))
    assert obj["event"] is None and obj["message"] == "caf\u00e9 5%" and obj["level"] == "warning"
    try:
        raise ValueError("boom")
    except ValueError:
        import sys
        rec = logging.getLogger("serval.x").makeRecord("serval.x", logging.ERROR, __file__, 1, "failed", (),
                                                       sys.exc_info())
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    assert "ValueError: boom" in json.loads(line)["exception"]


def test_known_lines_get_their_event_and_fields():
    rec = record("serval.routing", logging.WARNING, "backend %s:%d is %s%s", "198.19.3.2", 8080, "down",
                 " (Connection was refused by other side: 111: Connection refused.)")
    obj = json.loads(JsonFormatter().format(rec))
    assert obj["event"] == "backend_health"
    assert (obj["host"], obj["port"], obj["state"]) == ("198.19.3.2", 8080, "down")
    assert obj["error"].startswith("Connection was refused")
    rec = record("serval.routing", logging.WARNING, "routers down: %s; up: %s; default rule now %s",
                 ["198.19.20.1"], "-", "198.19.21.1")
    obj = json.loads(JsonFormatter().format(rec))
    assert (obj["event"], obj["down"], obj["up"]) == ("router_health", ["198.19.20.1"], "-")


def test_every_known_template_is_still_logged_somewhere():
    """An event name is a promise to whoever alerts on it: if a message changes, change
    serval/logs.py KNOWN_EVENTS with it."""
    sources = "".join(p.read_text() for d in ("gateway", "router", "dns_resolver", "serval")
                      for p in (REPO / d).rglob("*.py"))
    missing = [t for (_, t) in logs.KNOWN_EVENTS if f'"{t}"' not in sources]
    assert not missing, f"templates no longer logged (update serval/logs.py KNOWN_EVENTS): {missing}"


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, {n: logging.getLogger(n).level for n in ("serval", "nat")})
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


def test_setup_levels_and_format(restore_logging):
    out = io.StringIO()
    logs.setup("info", json_lines=True, stream=out, twisted=False)
    logs.setup("info", json_lines=True, stream=out, twisted=False)       # twice: still one handler
    logging.getLogger("serval.gateway").info("up")
    logging.getLogger("serval.gateway").debug("per flow: not at info")
    logging.getLogger("pyroute2.chatty").info("library noise")
    logging.getLogger("nat.sysctl").info("sysctl restored")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(o["logger"], o["message"]) for o in lines] == [("serval.gateway", "up"), ("nat.sysctl", "sysctl restored")]
    out = io.StringIO()
    logs.setup("debug", stream=out, twisted=False)
    logging.getLogger("serval.flow").debug("flow 1 opened")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} DEBUG serval.flow: flow 1 opened\n", out.getvalue())


def test_event_helper_costs_nothing_below_the_level(caplog):
    caplog.set_level(logging.INFO, logger="serval")
    event(logging.getLogger("serval.flow"), logging.DEBUG, "flow_opened", "flow %s", "x", flow="x")
    assert not caplog.records


# --- lines derived from counters ----------------------------------------------------------------
def events(caplog) -> list:
    return [(r.serval_event, r.getMessage(), r.levelno) for r in caplog.records if hasattr(r, "serval_event")]


def fake_gateway(translator, role):
    from tests.unit.test_metrics import fake_gateway
    return fake_gateway(translator, role)


def test_per_flow_lines_at_debug_and_a_summary_at_info(caplog):
    from sal.ip import aton
    from tests.unit.packets import RST, tcp_packet
    from tests.unit.test_migration import CGW2, take
    from tests.unit.test_translate import CLIENT, VIP, handshake, make_pair

    caplog.set_level(logging.DEBUG, logger="serval")
    client, server = make_pair()
    obs = GatewayObserver(fake_gateway(client, "client"))
    now = time.monotonic()
    def drain():                     # as the daemon does after each batch
        obs.flow_events(client.events)
        client.events.clear()
    handshake(client, server, now)
    drain()
    obs.tick(now)
    client.migrate(now, aton(CGW2))
    server.from_sal(take(client)[0], now)
    client.from_sal(take(server)[0], now + 0.002)
    drain()
    obs.tick(now + 1)
    client.from_legacy(tcp_packet(CLIENT, 40000, VIP, 80, 1001, 5001, RST), now + 1.5)
    drain()
    client.handle_timer(now + 5)     # it lingers, then goes: said once
    drain()
    obs.tick(now + 2)
    obs.summarize(now + 60, 60.0)
    got = events(caplog)
    names = [e[0] for e in got]
    assert names == ["flow_opened", "flow_migrated", "migrations_completed", "flow_closed", "flows_summary"], got
    opened, moved, done, closed, summary = got
    assert "198.19.1.2:40000 -> 198.18.0.10:80" in opened[1] and "web.svc.example" in opened[1]
    assert opened[2] == logging.DEBUG and closed[2] == logging.DEBUG
    assert done[1].startswith("migrations: 1 completed in the last 1 s (") and done[2] == logging.INFO
    assert "our address 198.19.2.1 -> 198.19.5.1" in moved[1]
    assert " reset after " in closed[1]
    assert summary[1] == "flows: 1 opened, 1 reset in the last 60 s; 0 live" and summary[2] == logging.INFO


def test_nothing_at_info_when_nothing_happened_and_no_flow_lines_at_info(caplog):
    from tests.unit.test_translate import handshake, make_pair

    caplog.set_level(logging.INFO, logger="serval")
    client, server = make_pair()
    obs = GatewayObserver(fake_gateway(client, "client"))
    obs.summarize(time.monotonic(), 60.0)
    assert events(caplog) == []
    handshake(client, server, time.monotonic())
    client.from_sal(b"\x45" + bytes(40), 0.0)                         # junk: dropped
    obs.tick(time.monotonic())
    obs.summarize(time.monotonic(), 60.0)
    got = events(caplog)
    assert [e[0] for e in got] == ["flows_summary", "drops_summary"], got
    assert re.fullmatch(r"dropped 1 packet\(s\) in the last 60 s: \w+ 1", got[1][1])


def test_router_registration_lines(caplog):
    from router.core import RouterCore
    from sal import registration as reg
    from sal.ip import aton
    from sal.serviceid import ServicePrefix, service_id_for

    caplog.set_level(logging.INFO, logger="serval")
    key = reg.Key("deployment", b"k" * 32)
    core = RouterCore("r0", [key], now=0.0)
    obs = RouterObserver(SimpleNamespace(core=core, reactor=None,
                                         cfg=SimpleNamespace(instance="r0", address=None, queue=2, metrics=None)))
    record_ = reg.Record("web.svc.example", ServicePrefix(service_id_for("web.svc.example", 80)), 1, 1)
    signer = reg.Signer(key, "sgw0")
    data, _ = signer.message(reg.REGISTER, time.time_ns(), address=aton("198.19.10.2"), records=[record_], hold_ms=200)
    core.on_control(data, 1.0, time.time_ns())
    core.on_control(data, 1.0, time.time_ns())                   # replayed
    obs.tick(1.0)
    core.handle_timer(2.0)
    obs.tick(2.0)
    got = events(caplog)
    assert got == [
        ("registrations_refused", "refused 1 registration-plane message(s) in the last 1 s: replay 1", logging.WARNING),
        ("registered", "registered: sgw0 at 198.19.10.2 offers web.svc.example", logging.INFO),
        ("registration_ended", "registration ended: sgw0 at 198.19.10.2 (expired): no refresh within its hold time",
         logging.WARNING)], got


def test_a_udp_flows_lines_name_its_legacy_ends(caplog):
    from tests.unit import test_udp_flows as udp

    caplog.set_level(logging.DEBUG, logger="serval")
    client, server = udp.make_pair()
    obs = GatewayObserver(fake_gateway(client, "client"))
    udp.open_flow(client, server)
    obs.flow_events(client.events)
    (opened,) = [e for e in events(caplog) if e[0] == "flow_opened"]
    assert f"{udp.CLIENT}:5353 -> {udp.VIP}:53/udp" in opened[1], opened
