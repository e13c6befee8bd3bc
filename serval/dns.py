"""``serval dns --config FILE``: the companion DNS resolver, in the foreground.

Names under the configured service zones get virtual addresses that the client gateway
maps back to serviceIDs (through the mappings file); every other name is forwarded to
the upstream resolvers. See docs/resolver.md.
"""
import sys

from serval.logs import add_json_flag as log_json_flag
from serval.logs import setup as setup_logs


def add_arguments(p):
    p.description = (
        "Serve DNS over UDP and TCP: service names (e.g. web.svc.example) resolve to virtual "
        "addresses owned by the client gateway; every other name is forwarded upstream, with a "
        "cache. Stops cleanly on SIGTERM or Ctrl-C.")
    p.add_argument("--config", "-c", required=True, help="the resolver's TOML config file "
                   "(see deploy/dns.toml)")
    p.add_argument("--check", action="store_true",
                   help="check the config, print what would be served, and exit (0: ok, 2: bad config)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="override the config's log_level (debug logs every query)")
    log_json_flag(p)


def run(args) -> int:
    from dns_resolver.config import ConfigError, load

    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"serval dns: bad config: {exc}", file=sys.stderr)
        return 2
    setup_logs(args.log_level or cfg.log_level, json_lines=args.log_json)
    if args.check:
        return check(cfg)
    from twisted.internet import reactor

    from dns_resolver.daemon import DnsDaemon

    import gc

    from serval.runner import serve

    # the config, zones and code stay: keep them out of the collector's walks
    return serve(DnsDaemon(cfg, reactor), reactor, "dns", when_running=gc.freeze)


def check(cfg) -> int:
    from dns_resolver.daemon import upstream_servers

    upstreams, source = upstream_servers(cfg)
    listen = ", ".join(f"{h}:{p}" for h, p in cfg.listen)
    print(f"{cfg.path}: ok")
    print(f"  listen     {listen} (UDP and TCP); clients from {', '.join(cfg.allow)}")
    for zone in cfg.zones:
        print(f"  zone       {zone.name} (ttl {zone.ttl} s, negative ttl {zone.negative_ttl} s)")
        for svc in zone.services:
            pin = f" pinned to {svc.address}" if svc.address else ""
            ports = f" ports {','.join(map(str, svc.ports))}" if svc.ports else ""
            udp = f" udp {','.join(map(str, svc.udp_ports))}" if svc.udp_ports else ""
            print(f"    service  {svc.name}{ports}{udp}{pin}")
    print(f"  virtual    {cfg.virtual_network}" + (f" excluding {', '.join(cfg.exclude)}" if cfg.exclude else ""))
    print(f"  mappings   {cfg.mappings or '(none: memory only)'}")
    print(f"  gateway    {cfg.gateway_control or '(none: addresses are never reclaimed)'}")
    print(f"  upstreams  {', '.join(f'{h}:{p}' for h, p in upstreams) or '(none)'} (from {source})")
    return 0
