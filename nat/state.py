"""Per-instance state file: what we changed, so a later run can undo it.

One JSON file per (instance, network namespace): ``<tag>.net<inode>.json`` in the state
directory (default ``/run/serval``). The namespace inode is part of the name because
several namespaces on one host share ``/run`` and each runs its own gateway instance.
A namespace made after another was deleted may get its inode again, so the file also
records the namespace's cookie, which is never reused: a file of an earlier namespace
reads as empty (what it recorded was undone with that namespace).
Writes are atomic (temp file + rename), so a SIGKILL never leaves a torn file.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from pathlib import Path
from typing import Any, Callable

DEFAULT_STATE_DIR = '/run/serval'
MAX_TAG = 17  # 'SERVAL-' + tag + '-PRE' must fit iptables' 28-char chain names


def instance_tag(instance: str) -> str:
    """Sanitized, length-bounded form of an instance name, used in every name we own.

    Characters outside ``[A-Za-z0-9_-]`` become ``_``; a name longer than 17 characters
    becomes its first 10 characters, ``_`` and 6 hex digits of its SHA-1. The result is
    deterministic (a new run finds a crashed run's leftovers) and a fixed point.
    """
    if not instance:
        raise ValueError('instance name must not be empty')
    tag = re.sub(r'[^A-Za-z0-9_-]', '_', instance)
    if len(tag) > MAX_TAG:
        digest = hashlib.sha1(instance.encode()).hexdigest()[:6]
        tag = f'{tag[:10]}_{digest}'
    return tag


def netns_id() -> int:
    """Identity of the current network namespace (inode of /proc/self/ns/net)."""
    return os.stat('/proc/self/ns/net').st_ino


SO_NETNS_COOKIE = getattr(socket, 'SO_NETNS_COOKIE', 71)


def netns_cookie() -> int | None:
    """The current network namespace's cookie: unique while the host is up, unlike its
    inode (Linux 5.14 and later; None where the kernel has none)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), 'little')
    except OSError:
        return None


def same_namespace(recorded: Any) -> bool:
    """Whether a record that carries ``recorded`` (a cookie, or None from a kernel or a
    version without them) was made in the current namespace, not an earlier one that had
    its inode."""
    return recorded is None or recorded == netns_cookie()


class StateFile:
    """JSON dict of sections (``sysctls``, ``routes``, ``firewall``) for one instance."""

    def __init__(self, instance: str, state_dir: str | os.PathLike | None = None):
        self.tag = instance_tag(instance)
        self.dir = Path(state_dir or DEFAULT_STATE_DIR)

    @property
    def path(self) -> Path:
        # Evaluated on each use: the namespace is the one we act in at that moment.
        return self.dir / f'{self.tag}.net{netns_id()}.json'

    def load(self) -> dict[str, Any]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f'corrupt state file {self.path}: {e}') from None
        if not isinstance(data, dict) or not same_namespace(data.get('netns')):
            return {}          # another (deleted) namespace's: nothing of it is here
        return data

    def get(self, section: str, default: Any = None) -> Any:
        return self.load().get(section, default)

    def update(self, section: str, fn: Callable[[Any], Any]) -> Any:
        """Replace ``section`` by ``fn(old)``; an empty result drops it, and the file
        goes away when no section is left."""
        data = self.load()
        value = fn(data.get(section))
        if value:
            data[section] = value
        else:
            data.pop(section, None)
        self._write(data)
        return value

    def _write(self, data: dict[str, Any]) -> None:
        path = self.path
        if not any(k not in ('instance', 'netns') for k in data):
            path.unlink(missing_ok=True)
            return
        data['instance'] = self.tag
        data['netns'] = netns_cookie()
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp')
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)


def state_files(state_dir: str | os.PathLike | None = None) -> list[Path]:
    """State files that belong to the current network namespace."""
    d = Path(state_dir or DEFAULT_STATE_DIR)
    return sorted(d.glob(f'*.net{netns_id()}.json')) if d.is_dir() else []
