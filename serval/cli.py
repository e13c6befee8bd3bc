"""``serval``: gateways, control and tools behind one command.

Each subcommand lives in its own module and registers itself through ``add_parser``;
imports are deferred so that ``serval decode`` does not need Twisted or root.
"""
import argparse
import importlib
import sys

# subcommand -> (module, help)
COMMANDS = {
    "gateway": ("gateway.cli", "run a client or server gateway"),
    "router": ("serval.router", "run a service router (registrations in, SYNs forwarded to live instances)"),
    "ctl": ("serval.ctl", "talk to a running gateway or router over its control socket"),
    "decode": ("serval.decode", "decode SAL packets in a pcap file"),
    "dns": ("serval.dns", "run the DNS resolver"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="serval",
        description="Serval service-centric networking for unmodified hosts and applications.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # argparse gives an optional positional (ctl's SERVICE) nothing when a flag comes
    # first: `serval ctl drain --cancel web.svc.example` leaves the name over
    if rest and getattr(args, "drain_service", "") is None and len(rest) == 1 and not rest[0].startswith("-"):
        args.drain_service = rest.pop()
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    return importlib.import_module(args._module).run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
