"""The fast-path manager: the kernel's flows kept in step with the translator's.

It loads the program, attaches it to the ingress of the interfaces the gateway
translates on (GRO and LRO off there, restored on stop), and follows the translator's
events: a flow enters the kernel once both handshakes are done (a server gateway's UDP
flow toward its backend only, until the backend's first answer has reached Python and
the health checks: ``UdpAnswered``), leaves it while a move is unconfirmed (the slow
path holds its packets) and comes back with the new path, and leaves for good at its
first FIN or RST (a UDP flow: its close, idle or not). The translator stays the owner of every flow;
the kernel's per-flow counters are folded into it (``refresh``) before anything reads
them: idle expiry, resets, snapshots, ``serval ctl flows``.

What it attached is recorded in the instance's state file. A clean stop detaches it;
after a crash the attached program keeps translating the established flows while no
daemon runs, and the next start adopts its maps (or, when it cannot, removes it).
"""
from __future__ import annotations

import logging
import os

from nat.state import StateFile, netns_id
from sal.flow import State

from ..translate.events import (FlowClosed, FlowClosing, FlowEstablished, FlowMoved, FlowMoving, FlowSteady,
                                PathMtuLowered, UdpAnswered)
from . import build, maps, tc
from .libbpf import (BpfError, BpfObject, Map, is_bpffs, map_fd_by_id, map_info, pin, pinned, prog_fd_by_id,
                     prog_id, prog_map_ids)

log = logging.getLogger("serval.fastpath")
PROGRAM = "serval_ingress"
MAPS = ("serval_flows", "serval_legacy", "serval_config", "serval_counters")
SECTION = "fastpath"


class FastPathUnavailable(RuntimeError):
    """Why the fast path cannot run here (one line, for the log)."""


def _possible_cpus() -> int:
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            return int(f.read().strip().split("-")[-1]) + 1
    except (OSError, ValueError):
        return os.cpu_count() or 1


class _Installed:
    """A flow in the kernel, and how much of the kernel's count is already folded in.
    ``both_ways`` False: only its SAL side is in (its legacy packets are Python's)."""

    __slots__ = ("legacy_key", "both_ways", "packets_out", "bytes_out", "packets_in", "bytes_in")

    def __init__(self, legacy_key: bytes, both_ways: bool = True):
        self.legacy_key = legacy_key
        self.both_ways = both_ways
        self.packets_out = self.bytes_out = self.packets_in = self.bytes_in = 0


class FastPath:
    def __init__(self, translator, instance: str, state_dir: str, mark: int, bpffs: str = "/sys/fs/bpf",
                 redirect: bool = False, loopback: bool = False):
        """``loopback``: a backend lives in this very namespace (a sidecar), so its
        replies arrive on lo, where the program is attached too."""
        self.t = translator
        self.loopback = loopback
        self.state = StateFile(instance, state_dir)
        self.tag = self.state.tag
        self.state_dir = state_dir
        self.mark = mark
        self.bpffs = bpffs
        self.redirect = redirect
        self.pins = None                         # where the program and maps are pinned, if anywhere
        self.obj = None
        self.prog_fd = -1
        self.prog_id = 0
        self.flows = self.legacy = self.config = self.counters = None
        self.links: dict[str, dict] = {}        # ifname -> attach record (+ "offloads")
        self.installed: dict[int, _Installed] = {}
        self.adopted = 0                         # kernel flows a crashed run left translating
        self._unclaimed: set[bytes] = set()      # adopted entries no resumed flow took yet
        self.install_failures = 0

    # --- start and stop --------------------------------------------------------------
    def start(self, interfaces: list[str]) -> None:
        """Load (or adopt) the program and attach it; FastPathUnavailable says why not."""
        if os.geteuid() != 0:
            raise FastPathUnavailable("needs root (CAP_BPF and CAP_NET_ADMIN)")
        try:
            if not self._adopt():
                self._load()
            self.config.update(b"\0\0\0\0", maps.config_value(self.mark, self.t.carriage, self.redirect))
            self.attach(interfaces)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the gateway runs without it
            self.stop()
            known = isinstance(exc, (OSError, build.BuildError))
            raise FastPathUnavailable(str(exc) if known else f"{type(exc).__name__}: {exc}") from None

    def _load(self) -> None:
        path = build.object_path(self.state_dir)
        self.obj = BpfObject(str(path))
        self.prog_fd = self.obj.program_fd(PROGRAM)
        fds = {name: self.obj.map_fd(name) for name in MAPS}
        self._open_maps(fds, owned=False)
        self.prog_id = prog_id(self.prog_fd)
        self._pin(fds)

    def _pin(self, fds: dict) -> None:
        """Pin the program and maps in the bpffs, per instance and network namespace, so
        the next start finds them by path (no CAP_SYS_ADMIN needed, unlike ids)."""
        if not is_bpffs(self.bpffs):
            log.info("no bpffs at %s: the fast path is not pinned (a restart finds it by id)", self.bpffs)
            return
        # (bpffs refuses names with a dot)
        pins = os.path.join(self.bpffs, "serval", f"{self.tag}-net{netns_id()}")
        os.makedirs(pins, exist_ok=True)
        for name, fd in (("prog", self.prog_fd), *fds.items()):
            path = os.path.join(pins, name)
            if os.path.exists(path):
                os.unlink(path)             # a crashed run's, not adopted
            pin(fd, path)
        self.pins = pins

    def _open_maps(self, fds: dict, owned: bool) -> None:
        self.flows = Map(fds["serval_flows"], 4, maps.FLOW.size, owned)
        self.legacy = Map(fds["serval_legacy"], maps.LEGACY_KEY.size, 4, owned)
        self.config = Map(fds["serval_config"], 4, maps.CONFIG.size, owned)
        self.counters = Map(fds["serval_counters"], 4, 8 * _possible_cpus(), owned)

    def _adopt(self) -> bool:
        """Take over what a run that did not stop cleanly left attached. False when there
        is nothing (or it cannot be taken: then it is removed)."""
        record = self.state.get(SECTION)
        if not record:
            return False
        live = {r["ifname"] for r in tc.attached(self.tag)}
        fds = {}
        try:
            if not live:
                raise BpfError(2, "no interface has its filter any more")
            pins = record.get("pins")
            if pins and os.path.exists(os.path.join(pins, "prog")):
                self.prog_fd = pinned(os.path.join(pins, "prog"))
                fds = {name: pinned(os.path.join(pins, name)) for name in MAPS}
                self.pins = pins
            else:
                self.prog_fd = prog_fd_by_id(record["prog_id"])
                for map_id in prog_map_ids(self.prog_fd):
                    fd = map_fd_by_id(map_id)
                    fds[map_info(fd)[0]] = fd
            for name, key_size, value_size in (("serval_flows", 4, maps.FLOW.size),
                                               ("serval_legacy", maps.LEGACY_KEY.size, 4),
                                               ("serval_config", 4, maps.CONFIG.size)):
                if map_info(fds[name])[1:] != (key_size, value_size):
                    raise BpfError(22, f"{name} has another layout (left by another release)")
            self._open_maps(fds, owned=True)
        except (BpfError, KeyError) as exc:
            log.info("removing the fast path a previous run left (%s)", exc)
            for fd in fds.values():
                os.close(fd)
            self._undo(record)
            self._close_fds()
            return False
        self.prog_id = record["prog_id"]
        self.links = {r["ifname"]: r for r in record.get("links", []) if r["ifname"] in live}
        self._unclaimed = set(self.flows.keys())
        self.adopted = len(self._unclaimed)
        log.info("adopted the fast path a previous run left: %d flow(s) were translated in the "
                 "kernel while no daemon ran", self.adopted)
        return True

    def attach(self, interfaces: list[str]) -> None:
        """Attach to the interfaces not attached yet (new links come and go), and to
        loopback where a backend of ours lives in this namespace."""
        for name in [*interfaces, *(["lo"] if self.loopback else [])]:
            if name in self.links or (name == "lo" and not self.loopback):
                continue
            record = tc.attach(name, self.prog_fd, self.tag)
            try:
                record["offloads"] = tc.set_offloads(
                    name, tc.LOOPBACK_OFF_FEATURES if name == "lo" else tc.OFF_FEATURES)
            except OSError as exc:
                record["offloads"] = {}
                log.warning("cannot turn GRO off on %s (%s): its super-packets take the slow path", name, exc)
            self.links[name] = record
            self._save()

    def _save(self) -> None:
        self.state.update(SECTION, lambda _: {"prog_id": self.prog_id, "pins": self.pins,
                                              "links": list(self.links.values())})

    def stop(self) -> None:
        """Detach everywhere, restore offloads, forget the state; flows stay Python's."""
        record = {"links": list(self.links.values()), "pins": self.pins}
        self.links.clear()
        self.pins = None
        self._undo(record)
        self.installed.clear()
        self._close_fds()
        if self.obj is not None:
            self.obj.close()
            self.obj = None

    def _undo(self, record: dict) -> None:
        for link in record.get("links", []):
            try:
                tc.detach(link, self.tag)
                tc.restore_offloads(link["ifname"], link.get("offloads") or {})
            except Exception as exc:  # noqa: BLE001 - undo the rest
                log.warning("fast path on %s: could not undo everything: %s", link.get("ifname"), exc)
        pins = record.get("pins")
        if pins and os.path.isdir(pins):
            for name in os.listdir(pins):
                os.unlink(os.path.join(pins, name))
            os.rmdir(pins)
            try:
                os.rmdir(os.path.dirname(pins))     # the "serval" folder, when it is empty
            except OSError:
                pass
        self.state.update(SECTION, lambda _: None)

    def _close_fds(self) -> None:
        for m in (self.flows, self.legacy, self.config, self.counters):
            if m is not None:
                m.close()
        self.flows = self.legacy = self.config = self.counters = None
        if self.obj is None and self.prog_fd >= 0:
            os.close(self.prog_fd)
        self.prog_fd = -1

    # --- following the translator ------------------------------------------------------
    def handle(self, events: list) -> None:
        for ev in events:
            if isinstance(ev, (FlowEstablished, FlowMoved)):
                self.install(ev.flow)
            elif isinstance(ev, UdpAnswered):
                self._answered(ev.flow)
            elif isinstance(ev, (FlowMoving, FlowClosing, FlowClosed)):
                self.remove(ev.flow)
            elif isinstance(ev, FlowSteady):
                # the program marked it Python's at the FIN or RST: in again, unmarked
                self.remove(ev.flow)
                self.install(ev.flow)
            elif isinstance(ev, PathMtuLowered):
                self._path_lowered(ev.flow.peer_addr)

    def _eligible(self, flow) -> bool:
        if not (self.t.flows.get(flow.sal.local_flow) is flow and flow.closed_at is None
                and flow.sal.state == State.ESTABLISHED and flow.held is None and flow.moving_peer is None
                and not flow.send_handshake_ack and not flow.sal.migrating):
            return False
        if flow.udp is None:
            return flow.legacy_key is not None and flow.legacy_fin_end is None and flow.remote_fin_end is None
        # UDP: not closing, and no helper (tftp.py moves its backend port under it)
        return not flow.sal.fin_sent and not flow.sal.peer_fin and flow.udp.helper is None

    def _toward_backend_only(self, flow) -> bool:
        """A server gateway's UDP flow whose backend never answered: the first answer
        must reach Python (``UdpAnswered``, the passive health check's evidence)."""
        return flow.udp is not None and self.t.role == "server" and not flow.bytes_out

    def _answered(self, flow) -> None:
        """The backend answered: its datagrams are the kernel's from now on too."""
        rec = self.installed.get(flow.sal.local_flow)
        if rec is None:
            self.install(flow)
        elif not rec.both_ways and not self._toward_backend_only(flow):
            try:
                self.legacy.update(rec.legacy_key, maps.FLOW_KEY.pack(flow.sal.local_flow))
            except BpfError:
                return                          # its answers stay on the slow path
            rec.both_ways = True

    def _path_lowered(self, peer: bytes) -> None:
        """A lower path MTU toward ``peer``: its UDP flows' size limit follows (TCP
        clamped its MSS at the SYN)."""
        for fid in list(self.installed):
            flow = self.t.flows.get(fid)
            if flow is not None and flow.udp is not None and flow.peer_addr == peer:
                self.remove(flow)
                self.install(flow)

    def install(self, flow) -> None:
        fid = flow.sal.local_flow
        if fid in self.installed or self.flows is None or not self._eligible(flow):
            return
        key = maps.FLOW_KEY.pack(fid)
        legacy_key = maps.legacy_key(flow)
        udp_max = maps.udp_max(self.t, flow) if flow.udp is not None else 0
        both_ways = not self._toward_backend_only(flow)
        try:
            self.flows.update(key, maps.flow_value(flow, self.t.carriage, udp_max))
            if both_ways:
                self.legacy.update(legacy_key, key)
        except BpfError as exc:
            self.flows.delete(key)
            self.install_failures += 1
            if self.install_failures in (1, 10, 100, 1000):
                log.warning("a flow stays on the slow path: %s (%d so far)", exc, self.install_failures)
            return
        self._unclaimed.discard(key)
        self.installed[fid] = _Installed(legacy_key, both_ways)

    def remove(self, flow) -> None:
        fid = flow.sal.local_flow
        rec = self.installed.get(fid)
        if rec is None:
            return
        key = maps.FLOW_KEY.pack(fid)
        self.legacy.delete(rec.legacy_key)     # first: no new packet finds the flow
        self._fold(flow, rec, self.flows.lookup(key))
        self.flows.delete(key)
        del self.installed[fid]

    def sweep(self) -> int:
        """Remove adopted kernel flows that no resumed flow claimed; returns how many."""
        n = 0
        for key in self._unclaimed:
            raw = self.flows.lookup(key)
            if raw is not None:
                self.legacy.delete(maps.legacy_key_of(raw))
                self.flows.delete(key)
                n += 1
        self._unclaimed.clear()
        return n

    # --- counters ------------------------------------------------------------------
    def refresh(self, flow) -> None:
        """Fold what the kernel counted for ``flow`` since the last look into it."""
        rec = self.installed.get(flow.sal.local_flow)
        if rec is not None:
            self._fold(flow, rec, self.flows.lookup(maps.FLOW_KEY.pack(flow.sal.local_flow)))

    def refresh_all(self) -> None:
        for fid in list(self.installed):
            flow = self.t.flows.get(fid)
            if flow is not None:
                self.refresh(flow)

    @staticmethod
    def _fold(flow, rec: _Installed, raw: bytes | None) -> None:
        if raw is None:
            return
        c = maps.KernelCounters(raw)
        if c.packets_out != rec.packets_out and flow.udp is None:
            flow.legacy_last_ack = c.legacy_last_ack
        flow.packets_out += c.packets_out - rec.packets_out
        flow.bytes_out += c.bytes_out - rec.bytes_out
        flow.packets_in += c.packets_in - rec.packets_in
        flow.bytes_in += c.bytes_in - rec.bytes_in
        rec.packets_out, rec.bytes_out, rec.packets_in, rec.bytes_in = \
            c.packets_out, c.bytes_out, c.packets_in, c.bytes_in
        if c.last_seen > flow.last_seen:
            flow.last_seen = c.last_seen

    def set_redirect(self, on: bool) -> None:
        """Hand translated packets straight to their next hop, or to the stack; the
        program reads this per packet, so every kernel flow follows at once."""
        self.redirect = on
        self.config.update(b"\0\0\0\0", maps.config_value(self.mark, self.t.carriage, on))

    def stats(self) -> dict:
        """The kernel's counters (summed over CPUs) and how many flows it holds."""
        out = {"fastpath_flows": len(self.installed), "fastpath_interfaces": len(self.links),
               "fastpath_redirect": "on" if self.redirect else "off",
               "fastpath_install_failures": self.install_failures, "fastpath_adopted": self.adopted}
        if self.counters is None:
            return out
        for i, name in enumerate(maps.COUNTERS):
            raw = self.counters.lookup(i.to_bytes(4, "little"))
            if raw is not None:
                out[f"fastpath_{name}"] = sum(int.from_bytes(raw[j:j + 8], "little") for j in range(0, len(raw), 8))
        return out

    def in_kernel(self, fid: int) -> bool:
        return fid in self.installed
