"""What this network namespace would apply to a translated packet that the fast path
hands straight to its next hop (``fast_path_redirect``): netfilter rules and policies
other than the gateways' own, nftables tables of its own, legacy iptables tables, IPsec
(xfrm) policies. With ``fast_path_redirect = "auto"`` the gateway redirects only while
this survey finds nothing; it is taken at start, on SIGHUP and every
``SURVEY_EVERY`` seconds (a rule added later is honoured from the next survey on).

The pure part reads what the tools print; ``survey`` runs them.
"""
from __future__ import annotations

import json
import shutil
import subprocess

from nat.firewall import CHAIN_PREFIX, Table, parse_save, rule_chain, rule_target

SURVEY_EVERY = 30.0


def foreign_rules(tables: dict[str, Table]) -> list[str]:
    """What of an ``iptables-save`` dump is not the gateways' own: rules outside their
    chains and not jumping into them, built-in chains whose policy is not ACCEPT."""
    found = []
    for t in tables.values():
        rules = [r for r in t.rules if not rule_chain(r).startswith(CHAIN_PREFIX)
                 and not (rule_target(r) or "").startswith(CHAIN_PREFIX)]
        if rules:
            found.append(f"{len(rules)} iptables rule(s) in table {t.name}")
        found += [f"policy {policy} on {t.name} {chain}" for chain, policy in sorted(t.chains.items())
                  if policy not in ("-", "ACCEPT")]
    return found


def native_nft_tables(listing: dict, iptables_tables: set[str]) -> list[str]:
    """nftables tables (``nft -j list tables``) that are not iptables-nft's own."""
    found = []
    for item in listing.get("nftables", []):
        table = item.get("table")
        if table and not (table.get("family") == "ip" and table.get("name") in iptables_tables):
            found.append(f"nftables table {table.get('family')} {table.get('name')}")
    return found


def survey(iptables: str = "iptables") -> list[str]:
    """Everything here a redirected packet would skip; empty when there is nothing. A
    tool that fails counts as something found: redirect stays off rather than guess."""
    def out(argv: list[str]) -> str:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True).stdout

    def look(what: str, fn) -> list[str]:
        try:
            return fn()
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            return [f"{what} failed ({exc})"]

    tables: dict[str, Table] = {}

    def iptables_rules() -> list[str]:
        tables.update(parse_save(out([f"{iptables}-save"])))
        return foreign_rules(tables)

    found = look(f"{iptables}-save", iptables_rules)
    try:
        legacy_backend = "legacy" in out([iptables, "-V"])
    except (OSError, subprocess.SubprocessError) as exc:
        return found + [f"{iptables} -V failed ({exc})"]
    if shutil.which("nft"):
        found += look("nft list tables", lambda: native_nft_tables(
            json.loads(out(["nft", "-j", "list", "tables"]) or "{}"), set() if legacy_backend else set(tables)))
    elif not legacy_backend:
        found.append("nft is not installed: this host's own nftables tables cannot be seen")
    if not legacy_backend:
        try:
            with open("/proc/net/ip_tables_names") as f:
                names = f.read().split()
        except OSError:
            names = []
        if names:
            found.append(f"legacy iptables tables ({', '.join(sorted(names))})")
    found += look("ip xfrm policy", lambda: ["IPsec (xfrm) policies"]
                  if out(["ip", "xfrm", "policy", "list"]).strip() else [])
    return found
