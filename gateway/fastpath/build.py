"""Where the compiled program comes from: the object ``make`` (or the Dockerfile) built
beside the source, or, where there is none, one compiled now with clang into the state
folder. The C source is the product; no object is committed."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent / "bpf"
SOURCE = SOURCE_DIR / "serval_tc.c"
HEADER = SOURCE_DIR / "fastpath.h"
OBJECT = SOURCE_DIR / "serval_tc.o"


class BuildError(RuntimeError):
    pass


def _fresh(obj: Path) -> bool:
    try:
        built = obj.stat().st_mtime
    except FileNotFoundError:
        return False
    return built >= max(SOURCE.stat().st_mtime, HEADER.stat().st_mtime)


def compile_object(out: Path) -> Path:
    """clang -target bpf, as the Makefile does."""
    clang = shutil.which("clang")
    if clang is None:
        raise BuildError("clang is not installed (apt install clang libbpf-dev), and no compiled "
                         f"{OBJECT.name} is next to the source")
    arch = subprocess.run(["gcc", "-dumpmachine"], capture_output=True, text=True).stdout.strip() \
        if shutil.which("gcc") else ""
    include = [f"-I/usr/include/{arch}"] if arch else []
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.stem}.{os.getpid()}.tmp.o")     # two gateways may start at once
    run = subprocess.run([clang, "-O2", "-g", "-Wall", "-target", "bpf", *include, "-c", str(SOURCE),
                          "-o", str(tmp)], capture_output=True, text=True)
    if run.returncode:
        raise BuildError(f"compiling {SOURCE.name} failed: {run.stderr.strip()[-2000:]}")
    os.replace(tmp, out)
    return out


def object_path(state_dir: str | None = None) -> Path:
    """A compiled object no older than the source."""
    if _fresh(OBJECT):
        return OBJECT
    cached = Path(state_dir or "/run/serval") / "bpf" / OBJECT.name
    if _fresh(cached):
        return cached
    return compile_object(cached)


if __name__ == "__main__":      # make: python -m gateway.fastpath.build
    print(compile_object(OBJECT))
