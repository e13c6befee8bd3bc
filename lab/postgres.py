"""A throwaway PostgreSQL server inside a lab host, for benchmarks and tests.

Run as the ``postgres`` user from Debian's packages (``/usr/lib/postgresql/*/bin``), its
data in a scratch folder, durability off (fsync, synchronous commit, full-page writes):
what is measured or tested is the network path, not the disk. Clients on 198.19.0.0/16
are trusted.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    """PostgreSQL or pgbench is not installed, or the server did not start."""


def binaries() -> Path | None:
    """The newest installed PostgreSQL's bin folder, or None (pgbench must be there too)."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not bins or shutil.which("pgbench") is None:
        return None
    return Path(bins[-1]).parent


def start(host, work: Path, address: str, port: int, max_connections: int = 40) -> Path:
    """Start a server on ``host`` listening on ``address``:``port``, its files under
    ``work``; returns its Unix socket folder once it listens (the lab kills it with the
    host's namespace)."""
    bindir = binaries()
    if bindir is None:
        raise PostgresUnavailable("PostgreSQL is not installed (Debian: postgresql)")
    work.mkdir(parents=True, exist_ok=True)
    data, sock = work / "pgdata", work / "pgsock"
    for folder in (data, sock):
        folder.mkdir(mode=0o700)
        shutil.chown(folder, "postgres", "postgres")
    os.chmod(work, 0o711)                        # the postgres user walks in to its folders
    as_postgres = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]
    r = host.run([*as_postgres, str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                  "-A", "trust", "--no-sync", "-E", "UTF8"], check=False, timeout=120)
    if r.returncode:
        raise PostgresUnavailable(f"initdb: exit {r.returncode}: {(r.stdout + r.stderr)[-400:]}")
    with open(data / "pg_hba.conf", "a") as f:
        f.write("host all all 198.19.0.0/16 trust\n")
    log = work / "postgres.log"
    host.popen([*as_postgres, str(bindir / "postgres"), "-D", str(data),
                "-c", f"listen_addresses={address}", "-c", f"port={port}",
                "-c", f"unix_socket_directories={sock}", "-c", "fsync=off",
                "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                "-c", f"max_connections={max_connections}", "-c", "shared_buffers=64MB"],
               stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not host.run(["ss", "-ltnH", f"sport = :{port}"], check=False).stdout.strip():
        if time.monotonic() > deadline:
            raise PostgresUnavailable("postgres did not listen: " + log.read_text()[-400:])
        time.sleep(0.05)
    return sock
