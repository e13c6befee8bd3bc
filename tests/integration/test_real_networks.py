"""Paths as users meet them: long round trips (a satellite) and damaged packets (a bad
link), each run first direct (plain routed TCP through the same namespaces, no gateways
running) and then through the gateway pair, in the same test and over the same router:

    client --- cgw === mid === sgw --- server      mid: a plain IP router, impaired
                                                   by lab.impair (no netem here)

Unmodified programs at both ends (curl, Python's http.server); the legacy hosts put
complete checksums on the wire (wire-like links), so a flipped bit is what a receiver
can detect, as on a real link.
"""
import json
import os
import subprocess
import time

import pytest

from lab.gateways import VIRTUAL_ADDR, RunningGateways
from lab.impair import Damage, delay_path
from lab.topologies import gateway_pair
from tests.integration.helpers import make_file, ruleset, sha256_file, start_http

MB = 1024 * 1024
CONNECTS = 5


def require(fast_path: str) -> None:
    """Skip (or fail, where CI requires it) a fast-path run the kernel cannot do here."""
    if fast_path == "on":
        from tests.unit.test_fastpath_bpf import _unavailable
        reason = _unavailable()
        if reason:
            if os.environ.get("SERVAL_REQUIRE_FASTPATH"):
                pytest.fail(f"SERVAL_REQUIRE_FASTPATH is set but {reason}")
            pytest.skip(reason)


def build(lab, tmp_path, size: int):
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("hello across a long path\n")
    src = make_file(www, "big.bin", size)
    pair = gateway_pair(lab, middle=True, wire=True)       # the server routes back: direct works
    start_http(pair.server, www)
    return pair, src


class Paths:
    """The same requests, direct or through the gateways."""

    def __init__(self, pair, src, tmp_path):
        self.pair, self.src, self.tmp = pair, src, tmp_path
        self.gws = None
        self.before = {}

    def base(self, through: bool) -> str:
        return f"http://{VIRTUAL_ADDR}" if through else f"http://{self.pair.server_addr}:8080"

    def start_gateways(self, fast_path: str, carriage: str = "ip") -> RunningGateways:
        self.before = {h.name: ruleset(h) for h in (self.pair.cgw, self.pair.sgw)}
        self.gws = RunningGateways(self.pair, carriage=carriage, fast_path=fast_path).start()
        return self.gws

    def stop_gateways(self) -> None:
        gws, self.gws = self.gws, None
        assert gws.stop() == {"client": 0, "server": 0}, (gws.log("client"), gws.log("server"))
        for h in (self.pair.cgw, self.pair.sgw):
            assert ruleset(h) == self.before[h.name], f"{h.name}: rules left behind"

    def connects(self, through: bool, n: int = CONNECTS) -> tuple[int, str]:
        """``n`` connections at once, each a whole HTTP exchange; (how many got 200, curl's
        complaints)."""
        args = []
        for i in range(n):
            args += ["-o", "/dev/null", f"{self.base(through)}/index.html?{i}"]
        r = self.pair.client.run(["curl", "-sS", "-Z", "--parallel-immediate", "--parallel-max", str(n),
                                  "-m", "60", "-w", "%{http_code} %{time_connect}\\n", *args],
                                 check=False, timeout=90)
        codes = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
        return codes.count("200"), r.stdout + r.stderr

    def download(self, through: bool, name: str, *curl_args: str) -> subprocess.Popen:
        out = self.tmp / name
        return self.pair.client.popen(["curl", "-sS", "--fail", "-m", "240", *curl_args, "-o", str(out),
                                       f"{self.base(through)}/big.bin"], stderr=subprocess.PIPE, text=True)

    def finish(self, dl: subprocess.Popen, name: str) -> tuple[bool, str]:
        """(the download completed with the source's SHA-256, why not)."""
        _, err = dl.communicate(timeout=260)
        out = self.tmp / name
        if dl.returncode:
            return False, f"curl exited {dl.returncode}: {err}"
        got = sha256_file(out)
        return got == sha256_file(self.src), f"SHA-256 {got}"


def rules(host) -> list[str]:
    """Rules and user chains (an emptied table may stay, as iptables leaves it)."""
    return [line for line in ruleset(host).splitlines() if line.startswith(("-A ", ":SV-"))]


def wait_for(what, condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("rtt,where,fast_path", [(1.0, "mid", "on"), (3.0, "mid", "on"), (1.2, "client", "off")],
                         ids=["1s-mid", "3s-mid", "1.2s-client-link-slow-path"])
def test_long_round_trip(lab, tmp_path, rtt, where, fast_path):
    """Connects and a 10 MB transfer at 1 s and 3 s RTT, the delay on the middle
    router (half each way): the SAL handshake takes as long as the legacy one, and the
    SAL's control timers must not give up first. And at 1.2 s RTT on the client's own
    link, as a user behind a satellite modem has it: the client repeats its SYN after
    1 s, and the repeat reaches the client gateway after the SAL handshake is done."""
    require(fast_path)
    pair, src = build(lab, tmp_path, 10 * MB)
    paths = Paths(pair, src, tmp_path)
    delayer = delay_path(pair, rtt, where)
    untouched = rules(delayer.host)
    delayer.start()
    try:
        direct_ok, direct_log = paths.connects(through=False)
        direct_dl = paths.finish(paths.download(False, "direct.bin"), "direct.bin")
        # the baseline: plain TCP over this path works, or the test says so
        assert direct_ok == CONNECTS, f"direct TCP failed at {rtt} s RTT: {direct_log}"
        assert direct_dl[0], f"direct TCP failed at {rtt} s RTT: {direct_dl[1]}"
        gws = paths.start_gateways(fast_path)
        through_ok, through_log = paths.connects(through=True)
        through_dl = paths.finish(paths.download(True, "through.bin"), "through.bin")
        stats = {role: gws.stats(role) for role in ("client", "server")}
        paths.stop_gateways()
    finally:
        held = delayer.stop()
    assert all(n > 100 for n in held["queued"].values()), held       # both ways were delayed
    assert rules(delayer.host) == untouched, "the delayer's rules and chains are gone"
    assert through_ok == direct_ok, f"{through_ok} of {CONNECTS} through the gateways: {through_log}\n{stats}"
    assert through_dl[0], f"through the gateways: {through_dl[1]}\n{stats}"
    for role, s in stats.items():
        assert s.get("flows_reset", 0) == 0 and s.get("internal_errors", 0) == 0, (role, s)
        assert s.get("flows_failed_control_timeout", 0) == 0, (role, s)
    assert stats["server"]["flows_opened"] == CONNECTS + 1, stats["server"]
    if where == "client":       # the case in point: every SYN came again, late
        assert stats["client"].get("syn_repeated", 0) >= CONNECTS, stats["client"]
    if fast_path == "on":                               # the bulk went through the kernel
        assert stats["client"]["fastpath_from_sal"] > 10 * MB // 1500 // 2, stats["client"]


@pytest.mark.parametrize("fast_path,carriage", [("on", "ip"), ("off", "ip"), ("on", "udp")])
def test_damaged_packets_leave_the_flow_and_its_bytes_intact(lab, tmp_path, fast_path, carriage):
    """During a transfer, 2% of the packets between the gateways (both ways) are
    corrupted; half of those have the TCP RST flag set rather than a random bit
    flipped (the checksum no longer matches, as on a real damaged link). Direct TCP
    drops them on their checksums and finishes; so must the flow through the gateways."""
    require(fast_path)
    pair, src = build(lab, tmp_path, 20 * MB)
    paths = Paths(pair, src, tmp_path)
    results, counters, stats = {}, {}, {}
    with Damage(pair.mid, pair.mid_cgw_if) as down, Damage(pair.mid, pair.mid_sgw_if) as up:
        for through in (False, True):
            name = "through" if through else "direct"
            if through:
                gws = paths.start_gateways(fast_path, carriage)
            before = {d: d.counters() for d in (down, up)}
            out = tmp_path / f"{name}.bin"
            dl = paths.download(through, out.name, "--limit-rate", "8M")
            wait_for(f"the {name} transfer under way", lambda: out.exists() and out.stat().st_size > MB)
            for d in (down, up):
                d.set(corrupt=0.02, flag_share=0.5)
            results[name] = paths.finish(dl, out.name)
            for d in (down, up):
                d.set()
            counters[name] = {side: {k: v - before[d][k] for k, v in d.counters().items()}
                              for side, d in (("down", down), ("up", up))}
            if through:
                stats = {role: gws.stats(role) for role in ("client", "server")}
                paths.stop_gateways()
    for name in ("direct", "through"):
        for side in ("down", "up"):         # data toward the client, and its ACKs
            assert counters[name][side]["flagged"] >= 3, (name, counters[name])
    assert results["direct"][0], f"direct TCP did not survive: {results['direct'][1]}"
    assert results["through"][0], f"through the gateways: {results['through'][1]}\n{counters}\n{stats}"
    for role, s in stats.items():
        assert s.get("flows_reset", 0) == 0 and s.get("internal_errors", 0) == 0, (role, s)
        # the RST-flagged packets reached each gateway and were ignored, counted
        assert s.get("dropped_fin_rst_bad_checksum", 0) >= 1, (role, s)
    if fast_path == "on":       # the kernel carried the flow until the damage began
        assert stats["client"]["fastpath_from_sal"] > MB // 1500, json.dumps(stats)


def test_a_damaged_rst_leaves_the_flow_in_the_kernel(lab, tmp_path):
    require("on")
    pair, src = build(lab, tmp_path, 20 * MB)
    paths = Paths(pair, src, tmp_path)
    gws = paths.start_gateways("on")
    out = tmp_path / "got.bin"
    with Damage(pair.mid, pair.mid_cgw_if) as down:
        dl = paths.download(True, out.name, "--limit-rate", "8M")
        wait_for("the transfer under way", lambda: out.exists() and out.stat().st_size > MB)
        down.set(corrupt=0.01, flag_share=1.0)          # a few RST-flagged packets, then none
        wait_for("a damaged RST", lambda: down.counters()["flagged"] >= 1)
        down.set()
        ok, why = paths.finish(dl, out.name)
    assert ok, why
    s = gws.stats("client")
    paths.stop_gateways()
    assert s["dropped_fin_rst_bad_checksum"] >= 1, s
    # the rest of the transfer went through the kernel again
    assert s["fastpath_from_sal"] > s["from_sal"], json.dumps(s)
