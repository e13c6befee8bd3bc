"""Long fuzz runs: ``python -m fuzz.run --inputs 1000000 [--targets a,b] [--jobs 2]``.

Each target gets ``--inputs`` inputs (split over ``--jobs`` worker processes, each with
its own seed derived from ``--seed``), bounded also by ``--max-seconds`` per target.
Progress is printed every few seconds; at the end a summary per target: inputs, rate,
findings. Each distinct finding (exception type, message, place) is written, with the
exact input and its traceback, to ``build/fuzz/<target>/``; replay one with
``python -m fuzz.run --replay FILE``.

Engines: ``builtin`` (default: each target's generator over a seeded ``random.Random``:
random bytes, mutations of real packets, structured packets) or ``atheris``
(coverage-guided libFuzzer; the fuzz input drives the same generators through
:class:`fuzz.common.BytesRandom`; needs ``pip install atheris``).
"""
import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from pathlib import Path

from .minimize import minimize, signature

OUT = Path("build/fuzz")


def _record(target, inp, exc, found: dict, out_dir: Path) -> bool:
    sig = signature(exc)
    if sig in found:
        found[sig] += 1
        return False
    found[sig] = 1
    small = minimize(target, inp, budget=500)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = out_dir / f"finding-{os.getpid()}-{len(found)}.txt"
    tb = "".join(traceback.format_exception(exc))
    name.write_text(f"# {sig}\n# {tb.strip().replace(chr(10), chr(10) + '# ')}\n{small!r}\n")
    print(f"  [{target.name}] FINDING {sig[0]} {sig[1][:60]} at {sig[2]}:{sig[3]} -> {name}", flush=True)
    return True


def _worker(name: str, inputs: int, seed: int, deadline: float, queue, engine: str) -> None:
    import random

    from .targets import TARGETS
    target = TARGETS[name]()
    found: dict = {}
    out_dir = OUT / name
    if engine == "atheris":
        _atheris(target, inputs, seed, deadline, queue, found, out_dir)
        return
    r = random.Random(seed)
    done = 0
    last = time.monotonic()
    while done < inputs and time.monotonic() < deadline:
        inp = target.generate(r)
        try:
            target.run(inp)
        except Exception as exc:      # noqa: BLE001 - every escape is a finding
            _record(target, inp, exc, found, out_dir)
        done += 1
        if done & 255 == 0 and time.monotonic() - last > 1.0:
            queue.put(("progress", name, seed, done, sum(found.values())))
            last = time.monotonic()
    queue.put(("done", name, seed, done, {repr(k): v for k, v in found.items()}))


def _atheris(target, inputs, seed, deadline, queue, found, out_dir) -> None:
    import atheris

    from .common import BytesRandom
    state = {"done": 0, "last": time.monotonic()}

    def one(data: bytes) -> None:
        if time.monotonic() >= deadline:
            raise SystemExit(0)
        inp = target.generate(BytesRandom(data))
        try:
            target.run(inp)
        except Exception as exc:      # noqa: BLE001
            _record(target, inp, exc, found, out_dir)
        state["done"] += 1
        if state["done"] >= inputs:       # libFuzzer exits the process after its last run:
            queue.put(("done", target.name, seed, state["done"], {repr(k): v for k, v in found.items()}))
            queue.close()                 # flush the report first
            queue.join_thread()
        elif time.monotonic() - state["last"] > 1.0:
            queue.put(("progress", target.name, seed, state["done"], sum(found.values())))
            state["last"] = time.monotonic()

    atheris.instrument_all()          # coverage of everything loaded (the code under test)
    atheris.Setup([sys.argv[0], f"-runs={inputs}", f"-seed={seed & 0x7FFFFFFF or 1}",
                   "-print_final_stats=0", "-max_len=4096"], one)
    try:
        atheris.Fuzz()
    except SystemExit:
        pass
    finally:
        if state["done"] < inputs:
            queue.put(("done", target.name, seed, state["done"], {repr(k): v for k, v in found.items()}))


def run_target(name: str, inputs: int, jobs: int, seed: int, max_seconds: float, engine: str) -> dict:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    deadline = time.monotonic() + max_seconds
    shares = [inputs // jobs + (1 if i < inputs % jobs else 0) for i in range(jobs)]
    procs = [ctx.Process(target=_worker, args=(name, n, seed * 1000 + i, deadline, queue, engine))
             for i, n in enumerate(shares) if n]
    start = time.monotonic()
    for p in procs:
        p.start()
    progress: dict = {}
    results: dict = {}
    last_print = 0.0
    while len(results) < len(procs):
        try:
            msg = queue.get(timeout=1.0)
        except Exception:
            if not any(p.is_alive() for p in procs) and queue.empty():
                break
            continue
        kind, _, wseed, done, extra = msg
        progress[wseed] = done
        if kind == "done":
            results[wseed] = extra
        now = time.monotonic()
        if now - last_print > 10 or kind == "done" and len(results) == len(procs):
            total = sum(progress.values())
            print(f"  [{name}] {total:>9} / {inputs} inputs, {total / (now - start):8.0f}/s, "
                  f"{sum(sum(r.values()) for r in results.values()) if results else 0} findings so far", flush=True)
            last_print = now
    for p in procs:
        p.join()
    elapsed = time.monotonic() - start
    total = sum(progress.values())
    findings: dict = {}
    for res in results.values():
        for k, v in res.items():
            findings[k] = findings.get(k, 0) + v
    return {"target": name, "inputs": total, "seconds": round(elapsed, 1),
            "rate": round(total / elapsed, 1) if elapsed else 0.0, "jobs": len(procs), "engine": engine,
            "distinct_findings": len(findings), "findings": sum(findings.values()), "kinds": findings}


def replay(path: str) -> int:
    from .targets import TARGETS
    text = Path(path).read_text()
    name = Path(path).parent.name
    inp = eval(text.split("\n")[-2] if not text.endswith(")\n") and not text.endswith("]\n") else
               [line for line in text.splitlines() if not line.startswith("#")][-1])
    target = TARGETS[name]()
    try:
        target.run(inp)
    except Exception:      # noqa: BLE001
        traceback.print_exc()
        return 1
    print("no finding: it passes now")
    return 0


def main(argv=None) -> int:
    from .targets import TARGETS
    ap = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, default=1_000_000, help="inputs per target (default 1000000)")
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of: {', '.join(TARGETS)}")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes per target")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=1800.0, help="bound per target (default 1800)")
    ap.add_argument("--engine", choices=("builtin", "atheris"), default="builtin")
    ap.add_argument("--json", help="also write the summary here")
    ap.add_argument("--replay", help="run one finding file again")
    args = ap.parse_args(argv)
    if args.replay:
        return replay(args.replay)
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        ap.error(f"unknown target(s) {', '.join(unknown)}")
    summary = []
    for name in names:
        print(f"{name}: {TARGETS[name].description} — {args.inputs} inputs, {args.jobs} jobs, "
              f"seed {args.seed}, engine {args.engine}", flush=True)
        summary.append(run_target(name, args.inputs, args.jobs, args.seed, args.max_seconds, args.engine))
    print("\nsummary")
    print(f"  {'target':<18} {'inputs':>9} {'seconds':>8} {'inputs/s':>9} {'findings':>9} {'distinct':>9}")
    for s in summary:
        print(f"  {s['target']:<18} {s['inputs']:>9} {s['seconds']:>8} {s['rate']:>9} {s['findings']:>9} "
              f"{s['distinct_findings']:>9}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if any(s["findings"] for s in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
