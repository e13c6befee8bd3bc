"""Remove every namespace (and its processes, /etc/netns dir) left by a Lab.

Run as ``python -m lab.cleanup`` before tests and by ``make clean``, so a
crashed earlier run leaves nothing behind. Exits 0 when there is nothing to do.
``python -m lab.cleanup sv1a2b ...`` limits it to those Lab prefixes (so a
test can clean its own leak without touching labs that run concurrently).
"""

import os
import sys

from pyroute2 import netns

from lab.topology import ETC_NETNS, MARKER, kill_namespaces, remove_namespace


def leftovers(prefixes=()) -> list[str]:
    names = set(netns.listnetns())
    # An /etc/netns dir can outlive its namespace if a run died mid-teardown.
    if os.path.isdir(ETC_NETNS):
        names.update(os.listdir(ETC_NETNS))
    return sorted(n for n in names if MARKER.match(n)
                  and (not prefixes or n.split("-", 1)[0] in prefixes))


def main(argv=None) -> int:
    names = leftovers(sys.argv[1:] if argv is None else argv)
    if not names:
        print("lab.cleanup: nothing to remove")
        return 0
    pids = kill_namespaces(names)
    if pids:
        print(f"lab.cleanup: killed {len(pids)} process(es): {' '.join(map(str, pids))}")
    for name in names:
        remove_namespace(name)
        print(f"lab.cleanup: removed {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
