"""``make demo`` as a user runs it: ``python -m lab.demo`` (all steps, then one), its exit
status and its closing summary, and a step whose check fails being reported as failed."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lab.demo import STEPS

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 600          # seconds: the demo takes well under a minute; a loaded machine, longer


def run_demo(*args, env=None) -> tuple[int, str]:
    proc = subprocess.Popen([sys.executable, "-m", "lab.demo", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.terminate()                     # the demo cleans up on SIGTERM
        out, _ = proc.communicate(timeout=120)
        pytest.fail(f"the demo ran over {TIMEOUT} s:\n{out[-6000:]}")
    return proc.returncode, out


def summary(out: str) -> dict[str, str]:
    """The summary table's rows: step -> "ok" or "FAILED"."""
    assert "==> summary" in out, out[-6000:]
    rows = {}
    for line in out.split("==> summary", 1)[1].splitlines()[2:]:
        m = re.match(r"    (\w+) +(ok|FAILED) +\d+\.\d s  ", line)
        if not m:
            break
        rows[m.group(1)] = m.group(2)
    return rows


def test_every_step(requires_netns):
    code, out = run_demo()
    assert code == 0, out[-8000:]
    assert summary(out) == {**{name: "ok" for name in STEPS}, "cleanup": "ok"}, out[-8000:]
    assert re.search(r"demo finished: 6 step\(s\) ok, nothing left behind", out)
    # what each step printed as it happened, checked by the demo itself: a few landmarks
    assert re.search(r"web\.svc\.example\.\s+\d+\s+IN A\s+198\.18\.\d+\.\d+", out)
    assert re.search(r'IN TXT\s+"v=serval1 port=80 id=[0-9a-f]{64}"', out)
    assert re.search(r"20 requests: srv0 \d+, srv1 \d+, none failed", out)
    assert re.search(r"migration gap [\d.]+ ms", out)
    assert "resumed 1 established flow(s)" in out
    by_hand = out.split("==> doing it by hand", 1)[1]
    assert all(f"# {name}: " in by_hand for name in STEPS)


def test_one_step(requires_netns):
    code, out = run_demo("--step", "spread")
    assert code == 0, out[-8000:]
    assert summary(out) == {"spread": "ok", "cleanup": "ok"}, out[-8000:]
    assert "[1/1] spread" in out and "[1/1] pair" not in out


def test_a_failed_check_fails_the_demo_saying_which_and_why(requires_netns, tmp_path):
    """A dig that answers a real address instead of a virtual one: the step's check must
    catch it, the demo exit 1 and name the step, and still clean up."""
    fake = tmp_path / "dig"
    fake.write_text("#!/bin/sh\ncat <<EOF\n;; ->>HEADER<<- opcode: QUERY, status: NOERROR, id: 7\n"
                    ";; flags: qr aa rd ra; QUERY: 1, ANSWER: 1, AUTHORITY: 0, ADDITIONAL: 0\n\n"
                    ";; ANSWER SECTION:\nweb.svc.example.\t30\tIN\tA\t203.0.113.7\n\nEOF\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    code, out = run_demo("--step", "name", env=env)
    assert code == 1, out[-8000:]
    assert summary(out) == {"name": "FAILED", "cleanup": "ok"}, out[-8000:]
    assert re.search(r"demo FAILED .*name: the A record 203\.0\.113\.7 is not a virtual address", out), out[-3000:]


def test_an_unknown_step_is_refused_with_the_list():
    r = subprocess.run([sys.executable, "-m", "lab.demo", "--step", "nosuch"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "invalid choice: 'nosuch'" in r.stderr and "failover" in r.stderr
