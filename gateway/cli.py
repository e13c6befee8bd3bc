"""``serval gateway client|server --config FILE``: run one gateway in the foreground."""
import sys

from serval.logs import add_json_flag as log_json_flag
from serval.logs import setup as setup_logs


def add_arguments(p):
    p.add_argument("role", choices=["client", "server"],
                   help="client: in front of legacy clients (grabs TCP toward virtual service "
                        "addresses); server: in front of legacy servers (DEMUX to backends)")
    p.add_argument("--config", "-c", required=True, help="the gateway's TOML config file")
    p.add_argument("--check", action="store_true",
                   help="check the config, print what would be served, and exit")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="override the config's log_level (debug adds a line per flow)")
    log_json_flag(p)


def run(args) -> int:
    from .config import ConfigError, load

    try:
        cfg = load(args.config, args.role)
    except ConfigError as exc:
        print(f"serval gateway: bad config: {exc}", file=sys.stderr)
        return 2
    # our own loggers at the chosen level; libraries (pyroute2 is chatty) at warning
    setup_logs(args.log_level or cfg.log_level, json_lines=args.log_json)
    if args.check:
        print(f"{cfg.path}: ok ({cfg.role} gateway, {len(cfg.services)} service(s), "
              f"{len(cfg.rules)} route(s), carriage {cfg.carriage}, queue {cfg.queue})")
        return 0
    from twisted.internet import reactor

    from serval.runner import serve

    from .daemon import Gateway

    gateway = Gateway(cfg, reactor)
    gateway.cli_log_level = args.log_level
    return serve(gateway, reactor, "gateway", when_running=gateway.install_signals)
