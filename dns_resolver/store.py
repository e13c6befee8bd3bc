"""The mappings file: the resolver's allocation store and the gateway's map.

One JSON document, replaced atomically (written to a temporary file in the same
directory, renamed over the old one), so a reader sees the old or the new file, never
half of one. The resolver's periodic flush and its exit also fsync it. The client gateway (``gateway/virtual_map.py``) reads
``address`` and ``name`` of each entry; the resolver adds ``allocated``,
``last_answered`` (Unix times) and ``pinned``::

    {"version": 1, "writer": "serval dns",
     "mappings": [{"address": "198.18.0.11", "name": "web.svc.example",
                   "allocated": 1700000000.0, "last_answered": 1700000100.0}]}
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time

log = logging.getLogger("serval.dns.store")


class MappingsFile:
    def __init__(self, path: str):
        self.path = path
        self.writes = 0

    def load(self) -> list[dict]:
        """The stored mappings; [] when there is no file yet. A file that cannot be
        read as mappings is moved aside (``.bad-<time>``) and treated as empty."""
        try:
            with open(self.path) as f:
                data = json.load(f)
            mappings = data["mappings"]
            if not isinstance(mappings, list):
                raise TypeError("'mappings' is not a list")
            return [m for m in mappings if isinstance(m, dict)]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            aside = f"{self.path}.bad-{int(time.time())}"
            log.warning("mappings file %s unreadable (%s): moved to %s, starting empty", self.path, exc, aside)
            try:
                os.replace(self.path, aside)
            except OSError:
                pass
            return []

    def save(self, records: list[dict], durable: bool = True) -> None:
        """Replace the file. ``durable`` also forces it to disk (fsync) first; an
        allocation only needs the gateway to see the new file (the page cache is
        enough), and an fsync can stall for a long time on a busy disk, so the
        allocator syncs on its periodic flush and at exit instead."""
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        body = json.dumps({"version": 1, "writer": "serval dns", "mappings": records}, indent=1)
        fd, tmp = tempfile.mkstemp(prefix=".mappings-", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(body + "\n")
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self.writes += 1


class MemoryStore:
    """A store that keeps the records in memory (no mappings file configured; tests)."""

    def __init__(self, records=None):
        self.records = list(records or [])
        self.writes = 0

    def load(self) -> list[dict]:
        return [dict(r) for r in self.records]

    def save(self, records: list[dict], durable: bool = True) -> None:
        self.records = [dict(r) for r in records]
        self.writes += 1
