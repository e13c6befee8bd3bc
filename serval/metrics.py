"""Prometheus metrics over HTTP, shared by the gateways, the router and the resolver.

* A small writer of the Prometheus text format (version 0.0.4): :class:`Family` (one
  metric with its HELP and TYPE and its samples), :class:`Histogram`, :func:`render`;
  and :func:`parse`, its inverse, for tests and tools.
* :func:`parse_address`: the ``metrics = "host:port"`` config value, loopback only
  unless ``metrics_public = true``.
* :func:`listen`: a twisted.web listener serving ``GET /metrics`` from a ``collect()``
  callable, called on the reactor at each scrape (so the numbers are read where they are
  kept, without locks).
* :func:`nfqueue_counters`: the kernel's counters of each NFQUEUE
  (``/proc/net/netfilter/nfnetlink_queue``, per network namespace).

What each daemon exposes is in ``serval/observe.py`` and docs/operations.md. No
``prometheus_client``: the format is a page of text, and this writer reads the daemons'
own counters at scrape time instead of keeping a second registry beside them.
Nothing here imports Twisted at module level (configs import :func:`parse_address`).
"""
from __future__ import annotations

import bisect
import ipaddress
import logging
import math
import re

log = logging.getLogger("serval.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_PORT = 9464
KINDS = ("counter", "gauge", "histogram", "untyped")
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
# seconds: from sub-millisecond lab round trips to the legacy SYN retransmissions (1 s, 3 s)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# --- the text format -------------------------------------------------------------------
class Histogram:
    """Observations counted into fixed buckets (upper bounds, seconds), with their sum."""

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.bounds = tuple(sorted(float(b) for b in buckets))
        if not self.bounds or any(math.isnan(b) or math.isinf(b) for b in self.bounds):
            raise ValueError("a histogram needs finite bucket bounds")
        self.counts = [0] * (len(self.bounds) + 1)      # the last one: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= it)``, ending with ``(inf, count)``."""
        out, running = [], 0
        for bound, n in zip(self.bounds + (math.inf,), self.counts):
            running += n
            out.append((bound, running))
        return out


class Family:
    """One metric: name, type, help text and samples (label sets and values)."""

    def __init__(self, name: str, kind: str, help_text: str):
        if not _NAME.match(name):
            raise ValueError(f"not a metric name: {name!r}")
        if kind not in KINDS:
            raise ValueError(f"not a metric type: {kind!r}")
        self.name, self.kind, self.help = name, kind, help_text
        self.samples: list[tuple[str, tuple, float]] = []     # (name suffix, labels, value)

    def add(self, value, **labels) -> Family:
        if self.kind == "histogram":
            raise TypeError("use add_histogram for a histogram family")
        self.samples.append(("", _labels(labels), value))
        return self

    def add_histogram(self, hist: Histogram, **labels) -> Family:
        if self.kind != "histogram":
            raise TypeError(f"{self.name} is a {self.kind}, not a histogram")
        base = _labels(labels)
        for bound, n in hist.cumulative():
            self.samples.append(("_bucket", base + (("le", format_value(bound)),), n))
        self.samples.append(("_sum", base, hist.sum))
        self.samples.append(("_count", base, hist.count))
        return self


def _labels(labels: dict) -> tuple:
    for key in labels:
        if not _LABEL.match(key) or key.startswith("__") or key == "le":
            raise ValueError(f"not a label name: {key!r}")
    return tuple((k, str(v)) for k, v in labels.items())


def format_value(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def render(families) -> bytes:
    """The text format: each family's HELP and TYPE lines, then its samples. A family
    without samples is left out; two families of one name are a bug."""
    out, seen = [], set()
    for fam in families:
        if fam.name in seen:
            raise ValueError(f"metric {fam.name} is written twice")
        seen.add(fam.name)
        if not fam.samples:
            continue
        out.append(f"# HELP {fam.name} {_escape_help(fam.help)}")
        out.append(f"# TYPE {fam.name} {fam.kind}")
        for suffix, labels, value in fam.samples:
            text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
            out.append(f"{fam.name}{suffix}{{{text}}} {format_value(value)}" if text
                       else f"{fam.name}{suffix} {format_value(value)}")
    return ("\n".join(out) + "\n").encode() if out else b""


_SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?\Z')
_PAIR = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(?:,|\Z)')


def parse(text: str) -> dict:
    """The samples of a text-format page: ``{(name, frozenset(labels.items())): value}``
    (with the TYPE of each family under ``("# TYPE", name)``). Raises ValueError on a
    line that is not the format."""
    out: dict = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 4 and parts[1] == "TYPE":
                out[("# TYPE", parts[2])] = parts[3]
            continue
        m = _SAMPLE.match(line)
        if not m:
            raise ValueError(f"line {n}: not a sample: {line!r}")
        labels, body = {}, m.group(2) or ""
        pos = 0
        while pos < len(body):
            p = _PAIR.match(body, pos)
            if not p:
                raise ValueError(f"line {n}: bad labels: {body!r}")
            labels[p.group(1)] = re.sub(r"\\(.)", lambda e: "\n" if e.group(1) == "n" else e.group(1), p.group(2))
            pos = p.end()
        raw = m.group(3)
        value = {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}.get(raw)
        out[(m.group(1), frozenset(labels.items()))] = float(raw) if value is None else value
    return out


def value(samples: dict, name: str, default=None, **labels):
    """One sample of a :func:`parse` result, by name and (all of) its labels."""
    return samples.get((name, frozenset((k, str(v)) for k, v in labels.items())), default)


def total(samples: dict, name: str, **labels) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    want = {(k, str(v)) for k, v in labels.items()}
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


# --- config ----------------------------------------------------------------------------
def parse_address(text, public: bool = False) -> tuple[str, int]:
    """``"127.0.0.1:9464"``, ``"[::1]:9464"`` → (host, port). Metrics tell anyone who can
    read them what runs here and how busy it is: a non-loopback address is refused
    unless ``public`` (the config's ``metrics_public = true``). Raises ValueError."""
    text = str(text).strip()
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)", text) or re.fullmatch(r"([^:\[\]]+):(\d+)", text)
    if not m:
        raise ValueError(f"metrics must be \"address:port\" (e.g. \"127.0.0.1:{DEFAULT_PORT}\"), "
                         f"not {text!r}")
    try:
        host = ipaddress.ip_address(m.group(1))
    except ValueError:
        raise ValueError(f"metrics: {m.group(1)!r} is not an IP address "
                         f"(write e.g. \"127.0.0.1:{DEFAULT_PORT}\")") from None
    port = int(m.group(2))
    if not 0 < port < 65536:
        raise ValueError(f"metrics: port {port} is out of range (1..65535)")
    if not host.is_loopback and not public:
        raise ValueError(f"metrics address {text} is not a loopback address: anyone who reaches it "
                         f"could read this daemon's metrics; set metrics_public = true to serve "
                         f"them there anyway, or use 127.0.0.1")
    return str(host), port


def parse_config(table: dict, fail) -> tuple[str, int] | None:
    """The ``metrics`` and ``metrics_public`` keys of a daemon's main table (None: off);
    ``fail(key, message)`` reports a mistake and does not return."""
    public = table.get("metrics_public", False)
    if not isinstance(public, bool):
        fail("metrics_public", "metrics_public must be true or false")
    if "metrics" not in table or table["metrics"] in ("", False):
        return None
    try:
        return parse_address(table["metrics"], public)
    except ValueError as exc:
        fail("metrics", str(exc))


# --- HTTP ------------------------------------------------------------------------------
def metrics_resource(collect):
    """The twisted.web resource: ``GET /metrics`` renders ``collect()``."""
    from twisted.web import resource

    class Metrics(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            if request.path not in (b"/metrics", b"/"):
                request.setResponseCode(404)
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                return b"not found: the metrics are at /metrics\n"
            try:
                body = render(collect())
            except Exception:       # a bug in a collector must not take the daemon down
                log.exception("collecting metrics")
                request.setResponseCode(500)
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                return b"error collecting metrics (see the daemon's log)\n"
            request.setHeader(b"content-type", CONTENT_TYPE.encode())
            return body

    return Metrics()


def listen(reactor, address: tuple[str, int], collect):
    """Serve ``GET /metrics`` on ``address``; ``collect()`` returns the families. Returns
    the listening port (``stopListening()`` to close). Raises OSError when it cannot."""
    from twisted.internet.error import CannotListenError
    from twisted.web import server

    class Site(server.Site):
        noisy = False

        def log(self, request):     # no line per scrape
            pass

    host, port = address
    try:
        return reactor.listenTCP(port, Site(metrics_resource(collect)), backlog=16, interface=host)
    except CannotListenError as exc:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise OSError(f"metrics: cannot listen on {where}: {exc.socketError}") from None


# --- the kernel's queue counters ---------------------------------------------------------
NFQUEUE_PROC = "/proc/net/netfilter/nfnetlink_queue"


def nfqueue_counters(path: str = NFQUEUE_PROC) -> dict[int, dict]:
    """``{queue number: {"waiting", "dropped", "user_dropped", "id_sequence"}}`` for each
    queue bound in this network namespace. Columns: queue number, peer port id,
    queue_total (packets waiting for a verdict), copy mode, copy range, queue_dropped
    (the queue was full), user_dropped (netlink could not deliver: our socket's buffer
    was full), id_sequence (the id of the last packet queued), 1."""
    out = {}
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        fields = line.split()
        try:
            out[int(fields[0])] = {"waiting": int(fields[2]), "dropped": int(fields[5]),
                                   "user_dropped": int(fields[6]), "id_sequence": int(fields[7])}
        except (ValueError, IndexError):
            continue
    return out


def nfqueue_families(prefix: str, queues: dict[int, str], path: str = NFQUEUE_PROC) -> list[Family]:
    """The kernel's counters of the daemon's own queues (``{number: purpose}``), as
    ``<prefix>_nfqueue_*`` with labels ``queue`` and ``purpose``."""
    counters = nfqueue_counters(path)
    fams = [Family(f"{prefix}_nfqueue_waiting", "gauge",
                   "Packets in the kernel queue waiting for our verdict (queue_total)"),
            Family(f"{prefix}_nfqueue_dropped_total", "counter",
                   "Packets the kernel dropped because the queue was full (queue_dropped)"),
            Family(f"{prefix}_nfqueue_user_dropped_total", "counter",
                   "Packets netlink failed to deliver to us: the socket buffer was full (user_dropped)"),
            Family(f"{prefix}_nfqueue_id_sequence", "counter",
                   "Id of the last packet the kernel queued: packets queued since the queue was bound")]
    for number, purpose in sorted(queues.items()):
        c = counters.get(number)
        if c is None:
            continue
        labels = {"queue": number, "purpose": purpose}
        for fam, key in zip(fams, ("waiting", "dropped", "user_dropped", "id_sequence")):
            fam.add(c[key], **labels)
    return fams
