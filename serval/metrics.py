"""Prometheus metrics over HTTP, shared by the gateways, the router and the resolver.

The exposition is prometheus_client's. Each daemon's observer (``serval/observe.py``) is
a custom collector: its ``collect()`` builds the metric families (``CounterMetricFamily``,
``GaugeMetricFamily``, ``HistogramMetricFamily``) from the daemon's own counters at each
scrape, so no second copy of a counter is kept. Here:

* :func:`registry`: a daemon's registry: its collector, and the library's process
  collector (CPU, memory, file descriptors of the daemon);
* :func:`render`: a page, in the format the scraper asked for (the library's content
  negotiation: the text format 0.0.4 by default, OpenMetrics for a Prometheus that asks);
* :class:`Histogram`: durations counted into buckets as a daemon learns of them, exposed
  as a histogram family;
* :func:`parse`, :func:`value`, :func:`total`: a page read back with the library's parser,
  for tests and tools;
* :func:`parse_address`: the ``metrics = "host:port"`` config value, loopback only
  unless ``metrics_public = true``;
* :func:`listen`: a twisted.web listener serving ``GET /metrics``. Not the library's
  ``prometheus_client.twisted.MetricsResource``: that one collects on the reactor's thread
  pool, and our collectors must run on the reactor, where the counters are kept (no locks);
* :func:`nfqueue_counters`: the kernel's counters of each NFQUEUE
  (``/proc/net/netfilter/nfnetlink_queue``, per network namespace).

What each daemon exposes is in ``serval/observe.py`` and docs/operations.md. Nothing here
imports Twisted or prometheus_client at module level: the configs import
:func:`parse_config`, and ``--check`` stays quick.
"""
from __future__ import annotations

import bisect
import ipaddress
import logging
import math
import re

log = logging.getLogger("serval.metrics")

DEFAULT_PORT = 9464
# seconds: from sub-millisecond lab round trips to the legacy SYN retransmissions (1 s, 3 s)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# --- exposition ----------------------------------------------------------------------------
class Histogram:
    """Observations counted into fixed buckets (upper bounds, seconds), with their sum."""

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.bounds = tuple(sorted(float(b) for b in buckets))
        if not self.bounds or any(math.isnan(b) or math.isinf(b) for b in self.bounds):
            raise ValueError("a histogram needs finite bucket bounds")
        self.counts = [0] * (len(self.bounds) + 1)      # the last one: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, name: str, help_text: str):
        """A ``HistogramMetricFamily``: cumulative buckets, ``le`` written as the library
        writes it (``"0.005"``, ``"1.0"``, ``"+Inf"``)."""
        from prometheus_client.core import HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        buckets, running = [], 0
        for bound, n in zip(self.bounds + (math.inf,), self.counts):
            running += n
            buckets.append((floatToGoString(bound), running))
        return HistogramMetricFamily(name, help_text, buckets=buckets, sum_value=self.sum)


class _Collector:
    """Adapts a ``collect()`` returning families to the library's collector protocol;
    a family without samples is left out (a metric absent until it has a value)."""

    def __init__(self, collect):
        self._collect = collect

    def collect(self):
        return [fam for fam in self._collect() if fam.samples]


def registry(collect):
    """A registry of a daemon's own: ``collect()`` (called at each scrape, on the
    reactor) and the library's process collector (``process_*``)."""
    from prometheus_client import CollectorRegistry, ProcessCollector

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(collect))
    ProcessCollector(registry=reg)
    return reg


def render(reg, accept: str | None = None) -> tuple[bytes, str]:
    """``(page, content type)`` of a registry, in the format ``accept`` (the scraper's
    Accept header) asks for: the text format 0.0.4 unless it asks for another."""
    from prometheus_client.exposition import choose_encoder

    encoder, content_type = choose_encoder(accept or "")
    return encoder(reg), content_type


def parse(text: str) -> dict:
    """The samples of a text-format page, read with prometheus_client's parser:
    ``{(sample name, frozenset(labels.items())): value}``, and each family's type and
    help under ``("# TYPE", family)`` and ``("# HELP", family)`` (the parser names a
    counter's family without its ``_total``). Raises ValueError on what is not the format,
    or on a sample written twice."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict = {}
    for fam in text_string_to_metric_families(text):
        out[("# TYPE", fam.name)] = fam.type
        out[("# HELP", fam.name)] = fam.documentation
        for sample in fam.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            if key in out:
                raise ValueError(f"sample {sample.name}{sample.labels} is written twice")
            out[key] = sample.value
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
def metrics_resource(reg):
    """The twisted.web resource: ``GET /metrics`` renders the registry ``reg``."""
    from twisted.web import resource

    class Metrics(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            if request.path not in (b"/metrics", b"/"):
                request.setResponseCode(404)
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                return b"not found: the metrics are at /metrics\n"
            accept = request.getHeader(b"accept")
            try:
                body, content_type = render(reg, accept.decode("latin-1") if accept else None)
            except Exception:       # a bug in a collector must not take the daemon down
                log.exception("collecting metrics")
                request.setResponseCode(500)
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                return b"error collecting metrics (see the daemon's log)\n"
            request.setHeader(b"content-type", content_type.encode())
            return body

    return Metrics()


def listen(reactor, address: tuple[str, int], reg):
    """Serve ``GET /metrics`` on ``address`` from the registry ``reg``. Returns the
    listening port (``stopListening()`` to close). Raises OSError when it cannot."""
    from twisted.internet.error import CannotListenError
    from twisted.web import server

    class Site(server.Site):
        noisy = False

        def log(self, request):     # no line per scrape
            pass

    host, port = address
    try:
        return reactor.listenTCP(port, Site(metrics_resource(reg)), backlog=16, interface=host)
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


def nfqueue_families(prefix: str, queues: dict[int, str], path: str = NFQUEUE_PROC) -> list:
    """The kernel's counters of the daemon's own queues (``{number: purpose}``), as
    ``<prefix>_nfqueue_*`` with labels ``queue`` and ``purpose``."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    counters = nfqueue_counters(path)
    labels = ["queue", "purpose"]
    fams = {"waiting": GaugeMetricFamily(f"{prefix}_nfqueue_waiting",
                                         "Packets in the kernel queue waiting for our verdict (queue_total)",
                                         labels=labels),
            "id_sequence": CounterMetricFamily(f"{prefix}_nfqueue_queued_total",
                                               "Packets the kernel queued since the queue was bound "
                                               "(id_sequence: the id of the last one)", labels=labels),
            "dropped": CounterMetricFamily(f"{prefix}_nfqueue_dropped_total",
                                           "Packets the kernel dropped because the queue was full (queue_dropped)",
                                           labels=labels),
            "user_dropped": CounterMetricFamily(f"{prefix}_nfqueue_user_dropped_total",
                                                "Packets netlink failed to deliver to us: the socket buffer was "
                                                "full (user_dropped)", labels=labels)}
    for number, purpose in sorted(queues.items()):
        c = counters.get(number)
        if c is None:
            continue
        for key, fam in fams.items():
            fam.add_metric([str(number), purpose], c[key])
    return list(fams.values())
