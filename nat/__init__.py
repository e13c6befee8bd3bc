"""Owned, reversible packet interception for the gateways (cf. sshuttle's firewall methods).

- :mod:`nat.firewall`: the instance's NFQUEUE chains in the raw table.
- :mod:`nat.sysctl`: sysctls with their originals saved in a state file.
- :mod:`nat.routes`: routes added through pyroute2, recorded in the same state file.
- :mod:`nat.interception`: :class:`Interception` combining the three, and
  :func:`cleanup` / :func:`cleanup_all` for leftovers of crashed runs.

Importing this package does no I/O and does not import pyroute2.
"""
from .firewall import DEFAULT_MARK, Firewall, FirewallError, ToQueue, cleanup_all_rules
from .interception import Interception, cleanup, cleanup_all
from .routes import OwnedRoutes, RouteError
from .state import DEFAULT_STATE_DIR, StateFile, instance_tag, netns_id
from .sysctl import Sysctls

__all__ = [
    'DEFAULT_MARK', 'DEFAULT_STATE_DIR', 'Firewall', 'FirewallError', 'Interception', 'ToQueue',
    'OwnedRoutes', 'RouteError', 'StateFile', 'Sysctls', 'cleanup', 'cleanup_all',
    'cleanup_all_rules', 'instance_tag', 'netns_id',
]
