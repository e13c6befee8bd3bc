"""A server gateway as a sidecar, in its backend's own network namespace (as in
docker-compose): the backend's replies reach the gateway over loopback. Established
flows are translated in the kernel there too (the program on lo hands them to the
interface their route leaves by); with the fast path off, Python translates them and
sends them anew. Transfers both ways, SHA-256 equal, nothing left behind."""
import subprocess
import sys

import pytest

from lab.gateways import VIRTUAL_ADDR, RunningGateways
from lab.topologies import gateway_pair
from tests.integration.helpers import make_file, ruleset, sha256_file, start_http, start_py_server
from tests.integration.test_fastpath import UPLOAD_PY, fast_path_required, finish, kernel_state  # noqa: F401

MB = 1024 * 1024


def build(lab, tmp_path, carriage, fast_path):
    www = tmp_path / "www"
    www.mkdir()
    pair = gateway_pair(lab, wire=True)
    before = {h.name: (ruleset(h), kernel_state(h)) for h in (pair.cgw, pair.server)}
    gws = RunningGateways(pair, carriage=carriage, fast_path=fast_path, sidecar=True,
                          extra_services=[("up.svc.example", 81, VIRTUAL_ADDR, 9000)])
    for path in gws.configs.values():       # pinned by id (no bpffs under `ip netns exec`)
        path.write_text(path.read_text().replace("[gateway]\n", '[gateway]\nbpffs = "/nonexistent"\n', 1))
    gws.start()
    start_http(pair.server, www)
    start_py_server(pair.server, "halfclose", 9000)
    return pair, gws, before, www


def transfer_both_ways(pair, tmp_path, www, down_mb, up_mb):
    src = make_file(www, "down.bin", down_mb * MB)
    out = tmp_path / "got.bin"
    r = pair.client.run(["curl", "-sS", "--fail", "-m", "120", "-o", str(out), f"http://{VIRTUAL_ADDR}/down.bin"],
                        check=False, timeout=130)
    assert r.returncode == 0, r.stderr
    assert sha256_file(out) == sha256_file(src)
    up = make_file(tmp_path, "up.bin", up_mb * MB)
    r = pair.client.run([sys.executable, "-c", UPLOAD_PY, str(up), VIRTUAL_ADDR, "81"], timeout=120)
    assert r.stdout.split() == [str(up_mb * MB), sha256_file(up)]


@pytest.mark.parametrize("carriage", ["ip", "udp"])
def test_a_sidecars_replies_are_translated_in_the_kernel(lab, tmp_path, carriage, fast_path_required):
    pair, gws, before, www = build(lab, tmp_path, carriage, "on")
    transfer_both_ways(pair, tmp_path, www, 50, 20)
    s = gws.stats("server")
    assert s["fastpath"] == "on" and s["fastpath_errors"] == 0 and s.get("internal_errors", 0) == 0
    # the download's data left the backend over lo and went out in the kernel
    assert s["fastpath_to_sal"] > 50 * MB // 1500
    assert s["fastpath_to_sal"] > 20 * s.get("to_sal", 0), s
    assert s["fastpath_redirected"] >= s["fastpath_to_sal"] - 10
    finish(pair, gws, before)


@pytest.mark.parametrize("carriage", ["ip", "udp"])
def test_a_sidecar_without_the_fast_path(lab, tmp_path, carriage):
    pair, gws, before, www = build(lab, tmp_path, carriage, "off")
    transfer_both_ways(pair, tmp_path, www, 20, 10)
    s = gws.stats("server")
    assert s["fastpath"] == "off" and s.get("internal_errors", 0) == 0
    assert s["to_sal"] > 20 * MB // 1500           # Python carried the download
    finish(pair, gws, before)
