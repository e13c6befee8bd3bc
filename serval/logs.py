"""Logging for every ``serval`` daemon: one line per event worth knowing, on stderr.

* Human-readable by default: ``2026-05-09 12:00:00,123 INFO serval.gateway: message``.
* ``--log-json``: one JSON object per line, always with ``time`` (RFC 3339, UTC),
  ``level``, ``logger``, ``message`` and ``event`` (a stable name such as
  ``flow_closed``, or null for a line that is no particular event), then the event's own
  fields (``"reason": "reset"``, ...), and ``exception`` when there is one.

Code that logs an event says so with :func:`event`. Lines logged elsewhere with plain
``log.info(...)`` get their event name and fields from :data:`KNOWN_EVENTS` (by logger
and message template), so the JSON stream names health, registration and migration
changes without touching the modules that log them.

Levels: the ``serval`` and ``nat`` loggers at the chosen level, everything else
(libraries, Twisted's own log) at warning. See docs/operations.md for what is logged when.
"""
from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

HUMAN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
RESERVED = ("time", "level", "logger", "message", "event", "exception")
LEVELS = ("debug", "info", "warning", "error")

# (logger, message template) -> (event, names of the template's arguments)
KNOWN_EVENTS: dict[tuple[str, str], tuple[str, tuple]] = {
    ("serval.gateway", "%s gateway up: queue %d, carriage %s, %d rule(s) installed, control socket %s"):
        ("started", ("role", "queue", "carriage", "rules", "control_socket")),
    ("serval.gateway", "stopped: rules, routes and sysctls restored; %s"): ("stopped", ("summary",)),
    ("serval.gateway", "could not start: %s"): ("start_failed", ("error",)),
    ("serval.gateway", "moving %d flow(s) toward %s to our address %s"):
        ("migration_started", ("flows", "peer", "address")),
    ("serval.gateway", "new flows now leave from %s (was %s)"): ("address_changed", ("address", "previous")),
    ("serval.gateway", "no path to %s for now (%s): its flows wait"): ("no_path", ("peer", "error")),
    ("serval.gateway", "draining: no new flows; waiting up to %.0f s for %d live flow(s)"):
        ("draining", ("timeout_s", "flows")),
    ("serval.gateway", "drain time is up: %d flow(s) still live (saved for a quick restart)"):
        ("drain_timeout", ("flows",)),
    ("serval.gateway", "reloaded %s: %d service(s), %d route(s); live flows untouched"):
        ("reloaded", ("path", "services", "routes")),
    ("serval.gateway", "resumed %d established flow(s) from a snapshot %.1f s old"): ("resumed", ("flows", "age_s")),
    ("serval.routing", "backend %s:%d is %s%s"): ("backend_health", ("host", "port", "state", "error")),
    ("serval.routing", "routers down: %s; up: %s; default rule now %s"):
        ("router_health", ("down", "up", "default_rule")),
    ("serval.routing", "our address is now %s: registering from it"): ("registration_address", ("address",)),
    ("serval.routing", "unregistered from %d router(s)"): ("unregistered", ("routers",)),
    ("serval.routing", "service %s %s"): ("drain", ("service", "state")),
    ("serval.router", "router %s up: SYNs to %s (queue %d), registrations on udp/%d, %d key(s), %d rule(s)"):
        ("started", ("instance", "address", "queue", "registration_port", "keys", "rules")),
    ("serval.router", "could not start: %s"): ("start_failed", ("error",)),
    ("serval.dns", "dns resolver up: listening on %s (UDP and TCP), clients from %s"):
        ("started", ("listen", "allow")),
    ("serval.dns", "stopped: %s"): ("stopped", ("summary",)),
    ("serval.dns", "could not start: %s"): ("start_failed", ("error",)),
    ("serval.dns", "the gateway at %s answers again"): ("gateway_health", ("gateway",)),
    ("serval.dns.upstream", "upstream %s failed (%s): %s"): ("upstream_health", ("upstream", "error", "action")),
    ("serval.dns.upstream", "upstream %s answers again"): ("upstream_health", ("upstream",)),
    ("serval.dns.allocator", "allocated %s -> %s"): ("allocated", ("name", "address")),
    ("serval.dns.allocator", "reclaimed %s -> %s (last answered %.0f s ago, no live flow)"):
        ("reclaimed", ("name", "address", "idle_s")),
}


def event(logger: logging.Logger, level: int, name: str, message: str, *args, **fields) -> None:
    """Log ``message % args`` as event ``name`` with ``fields`` (JSON-able values; none
    of them named like the reserved keys)."""
    if logger.isEnabledFor(level):
        logger.log(level, message, *args, extra={"serval_event": name, "serval_fields": fields})


def event_of(record: logging.LogRecord) -> tuple[str | None, dict]:
    """A record's event name and fields: its own, or from :data:`KNOWN_EVENTS`."""
    name = getattr(record, "serval_event", None)
    if name is not None:
        return name, dict(getattr(record, "serval_fields", None) or {})
    known = KNOWN_EVENTS.get((record.name, record.msg)) if isinstance(record.msg, str) else None
    if known is None:
        return None, {}
    name, keys = known
    args = record.args if isinstance(record.args, tuple) else ()
    return name, {k: _plain(v) for k, v in zip(keys, args)}


def _plain(v):
    if isinstance(v, str):
        return v.strip().strip("()").strip()
    if isinstance(v, (int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple, set)):
        return [_plain(x) for x in v]
    return str(v)


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        name, fields = event_of(record)
        obj = {"time": datetime.fromtimestamp(record.created, UTC)
               .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
               "level": record.levelname.lower(), "logger": record.name,
               "message": record.getMessage(), "event": name}
        for key, v in fields.items():
            obj[key if key not in RESERVED else f"field_{key}"] = v
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            obj["exception"] = record.exc_text
        return json.dumps(obj, default=str, ensure_ascii=False)


_twisted_bridged = False


def setup(level: str = "info", json_lines: bool = False, stream=None, twisted: bool = True) -> None:
    """Configure logging for a daemon (idempotent: replaces earlier handlers)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(HUMAN_FORMAT))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    for name in ("serval", "nat"):
        logging.getLogger(name).setLevel(str(level).upper())
    if twisted:
        _bridge_twisted()


def _bridge_twisted() -> None:
    """Twisted's own log (an unhandled error in a Deferred, say) into ours, at warning
    and above; without this it is buffered and never seen."""
    global _twisted_bridged
    if _twisted_bridged:
        return
    _twisted_bridged = True
    try:
        from twisted.logger import (
            FilteringLogObserver,
            LogLevel,
            LogLevelFilterPredicate,
            STDLibLogObserver,
            globalLogBeginner,
        )
    except ImportError:
        return
    keep = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(STDLibLogObserver(name="twisted"), [keep])],
                                     redirectStandardIO=False)


def add_json_flag(parser) -> None:
    """A daemon command's ``--log-json``."""
    parser.add_argument("--log-json", action="store_true",
                        help="log one JSON object per line (time, level, logger, message, event and "
                             "the event's fields) instead of plain text")
