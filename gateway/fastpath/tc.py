"""Attaching the program (a clsact qdisc and a direct-action bpf filter on each
interface's ingress) and the offload settings it needs, with pyroute2, in the
calling process's network namespace."""
from __future__ import annotations

import zlib

from pyroute2 import IPRoute
from pyroute2.ethtool import Ethtool
from pyroute2.netlink.exceptions import NetlinkError

INGRESS = "ffff:fff2"
CLSACT = 0xFFFF0000
# GRO and LRO merge received TCP into super-packets, which nothing can segment once
# they carry a SAL header: forwarded TCP must reach translation wire-sized.
OFF_FEATURES = ("rx-gro", "rx-lro")
# On loopback (a backend in this namespace answering translated connections) the
# sender's own TCP must cut its segments wire-sized and checksum them whole: TSO, GSO
# and checksum offload off there.
LOOPBACK_OFF_FEATURES = ("tx-tcp-segmentation", "tx-generic-segmentation", "tx-checksum-ip-generic")


def filter_name(tag: str) -> str:
    return f"serval-{tag}"


def priority(tag: str) -> int:
    """A filter priority of the instance's own, so two instances share an interface."""
    return 0x5E00 + zlib.crc32(tag.encode()) % 0x100


def attach(ifname: str, prog_fd: int, tag: str) -> dict:
    """Our filter on ``ifname``'s ingress (replacing a crashed run's); returns what to
    undo: {"ifname", "ifindex", "added_qdisc"}."""
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        added = False
        if not any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=index)):
            ipr.tc("add", kind="clsact", index=index)
            added = True
        ipr.tc("replace-filter", kind="bpf", index=index, handle=1, fd=prog_fd, name=filter_name(tag),
               parent=INGRESS, classid=1, direct_action=True, prio=priority(tag))
    return {"ifname": ifname, "ifindex": index, "added_qdisc": added}


def detach(record: dict, tag: str) -> None:
    """Undo ``attach``: our filter, and the clsact qdisc if we added it and it is empty."""
    with IPRoute() as ipr:
        index = record["ifindex"]
        try:
            ipr.tc("del-filter", kind="bpf", index=index, handle=1, parent=INGRESS, prio=priority(tag))
        except NetlinkError as exc:
            if exc.code not in (2, 19, 22):        # gone already (or the link is)
                raise
        if record.get("added_qdisc"):
            try:
                if not ipr.get_filters(index=index, parent=INGRESS) and \
                        not ipr.get_filters(index=index, parent="ffff:fff3"):
                    ipr.tc("del", kind="clsact", index=index)
            except NetlinkError as exc:
                if exc.code not in (2, 19, 22):
                    raise


def attached(tag: str) -> list[dict]:
    """The interfaces where this instance's filter is attached now: [{"ifname", "ifindex"}]."""
    name = filter_name(tag)
    found = []
    with IPRoute() as ipr:
        for link in ipr.get_links():
            index = link["index"]
            try:
                filters = ipr.get_filters(index=index, parent=INGRESS)
            except NetlinkError:
                continue
            for f in filters:
                opts = f.get_attr("TCA_OPTIONS")
                if opts and opts.get_attr("TCA_BPF_NAME") == name:
                    found.append({"ifname": link.get_attr("IFLA_IFNAME"), "ifindex": index})
                    break
    return found


def set_offloads(ifname: str, names=OFF_FEATURES) -> dict:
    """Turn the features ``names`` off where they can change; returns the old values."""
    eth = Ethtool()
    try:
        features = eth.get_features(ifname)
        old = {}
        for name in names:
            feature = features.features.get(name)
            if feature is not None and feature.available and feature.enable:
                old[name] = True
                feature.enable = False
        if old:
            eth.set_features(ifname, features)
        return old
    finally:
        eth.close()


def restore_offloads(ifname: str, old: dict) -> None:
    if not old:
        return
    eth = Ethtool()
    try:
        features = eth.get_features(ifname)
        for name, value in old.items():
            if name in features.features:
                features.features[name].enable = value
        eth.set_features(ifname, features)
    finally:
        eth.close()
