"""``serval router --config FILE``: run a service router in the foreground."""
import sys

from serval.logs import add_json_flag as log_json_flag
from serval.logs import setup as setup_logs


def add_arguments(p):
    p.add_argument("--config", "-c", required=True, help="the router's TOML config file (see deploy/router.toml)")
    p.add_argument("--check", action="store_true", help="check the config and exit")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="override the config's log_level")
    log_json_flag(p)


def run(args) -> int:
    from router.config import RouterConfigError, load

    try:
        cfg = load(args.config)
    except RouterConfigError as exc:
        print(f"serval router: bad config: {exc}", file=sys.stderr)
        return 2
    setup_logs(args.log_level or cfg.log_level, json_lines=args.log_json)
    from router.daemon import Router, describe

    if args.check:
        print(describe(cfg))
        return 0
    from twisted.internet import reactor

    from serval.runner import serve

    return serve(Router(cfg, reactor), reactor, "router")
