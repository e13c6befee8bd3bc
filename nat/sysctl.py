"""Sysctls changed by an instance, with their original values kept in its state file.

The original is written to the state file *before* the sysctl changes, so after a
SIGKILL the next run (``nat.cleanup``) still knows what to put back. Values are read and
written through ``/proc/sys`` directly; in a network namespace ``/proc/sys/net`` shows
that namespace's values.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

from .state import StateFile

log = logging.getLogger(__name__)


def sysctl_relpath(name: str) -> str:
    """``net.ipv4.conf.eth0/1.rp_filter`` -> ``net/ipv4/conf/eth0.1/rp_filter``.

    Dotted names follow sysctl(8): a ``/`` inside a component stands for a literal dot
    (interface names such as ``eth0.1``). Absolute ``/proc/sys/...`` paths are accepted.
    """
    if name.startswith('/proc/sys/'):
        parts = name[len('/proc/sys/'):].split('/')
    else:
        parts = [p.replace('/', '.') for p in name.split('.')]
    if not all(parts) or any(p in ('.', '..') for p in parts):
        raise ValueError(f'bad sysctl name {name!r}')
    return '/'.join(parts)


class Sysctls:
    def __init__(self, instance: str, state_dir: str | os.PathLike | None = None,
                 proc_root: str | os.PathLike = '/proc/sys'):
        self.state = StateFile(instance, state_dir)
        self.root = Path(proc_root)

    def read(self, name: str) -> str:
        return self._read(sysctl_relpath(name))

    def _read(self, rel: str) -> str:
        return (self.root / rel).read_text().strip()

    def _write(self, rel: str, value: str) -> None:
        with open(self.root / rel, 'w') as f:
            f.write(value + '\n')

    def set(self, values: Mapping[str, object]) -> None:
        """Set each sysctl, first recording its original value (only the first time, so
        a repeated ``set`` or a crashed earlier run never records our own value)."""
        for name, value in values.items():
            rel, want = sysctl_relpath(name), str(value).strip()
            cur = self._read(rel)
            saved = self.state.get('sysctls') or {}
            if rel not in saved:
                if cur == want:
                    continue  # nothing to change, nothing to restore
                self.state.update('sysctls', lambda s: {**(s or {}), rel: cur})
            if cur != want:
                self._write(rel, want)

    def restore(self) -> None:
        """Put back every recorded original, newest first; a sysctl whose device is gone
        is dropped. Failures stay recorded and the first is raised after trying all."""
        error = None
        for rel, orig in reversed(list((self.state.get('sysctls') or {}).items())):
            try:
                self._write(rel, orig)
            except FileNotFoundError:
                log.info('sysctl %s is gone, not restored', rel)
            except OSError as e:
                log.warning('cannot restore sysctl %s=%s: %s', rel, orig, e)
                error = error or e
                continue
            self.state.update('sysctls', lambda s: {k: v for k, v in (s or {}).items() if k != rel})
        if error:
            raise error
