"""nat/ against real iptables, /proc/sys and routes, each test in a fresh netns.

The code under test runs in the namespace through ``ip netns exec <ns> python -c ...``;
the test itself stays outside and only compares what the helpers print.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason='needs root (network namespaces, iptables)'),
    pytest.mark.skipif(shutil.which('iptables') is None or shutil.which('iptables-restore') is None,
                       reason='iptables / iptables-restore not installed'),
    pytest.mark.skipif(shutil.which('ip') is None, reason='iproute2 (ip) not installed'),
]

PRE = [['-p', 'tcp', '-d', '198.18.0.0/16'], ['-p', '144', '-d', '198.19.2.1'],
       ['-p', 'udp', '-d', '198.19.2.1', '--dport', '54324']]
OUT = [['-p', 'tcp', '-s', '198.19.3.2', '--sport', '80', '--dport', '61000:64999']]
ROUTE = {'dst': '198.18.0.0/16', 'dev': 'sv0', 'prefsrc': '198.19.2.1'}
SYSCTL_NAMES = ['net.ipv4.ip_forward', 'net.ipv4.conf.sv0.accept_local',
                'net.ipv4.conf.sv0.rp_filter', 'net.ipv4.conf.all.rp_filter']


class Netns:
    def __init__(self, name: str, state_dir: Path):
        self.name, self.state_dir, self.procs = name, state_dir, []

    def sh(self, cmd: str, check: bool = True) -> str:
        p = subprocess.run(['ip', 'netns', 'exec', self.name, 'sh', '-c', cmd],
                           capture_output=True, text=True, timeout=60)
        if check and p.returncode:
            raise AssertionError(f'{cmd!r} failed: {p.stderr}')
        return p.stdout

    def _argv(self, code: str) -> list[str]:
        prelude = f'import json, nat\nSTATE = {str(self.state_dir)!r}\n'
        return ['ip', 'netns', 'exec', self.name, sys.executable, '-c',
                prelude + textwrap.dedent(code)]

    def py(self, code: str) -> subprocess.CompletedProcess:
        env = {**os.environ, 'PYTHONPATH': str(REPO)}
        return subprocess.run(self._argv(code), capture_output=True, text=True, env=env, timeout=60)

    def run(self, code: str) -> str:
        p = self.py(code)
        assert p.returncode == 0, f'helper failed:\n{p.stderr}'
        return p.stdout

    def popen(self, code: str) -> subprocess.Popen:
        env = {**os.environ, 'PYTHONPATH': str(REPO)}
        p = subprocess.Popen(self._argv(code), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
        self.procs.append(p)
        return p

    def save(self) -> str:
        """iptables-save without comments and counters."""
        lines = [re.sub(r'\[\d+:\d+\]', '[0:0]', ln) for ln in self.sh('iptables-save').splitlines()
                 if not ln.startswith('#')]
        return '\n'.join(lines)

    def sysctls(self) -> dict[str, str]:
        return {n: self.sh(f'cat /proc/sys/{n.replace(".", "/")}').strip() for n in SYSCTL_NAMES}

    def routes(self) -> str:
        return self.sh('ip -4 route show table main')


def _make_netns(state_dir: Path) -> Netns:
    name = f'svnat-{uuid.uuid4().hex[:8]}'
    subprocess.run(['ip', 'netns', 'add', name], check=True)
    ns = Netns(name, state_dir)
    try:
        ns.sh('ip link set lo up; ip link add sv0 type veth peer name sv1; '
              'ip addr add 198.19.2.1/24 dev sv0; ip addr add 198.19.3.1/24 dev sv1; '
              'ip link set sv0 up; ip link set sv1 up')
    except BaseException:
        subprocess.run(['ip', 'netns', 'del', name])
        raise
    return ns


def _destroy(ns: Netns) -> None:
    for p in ns.procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    subprocess.run(['ip', 'netns', 'del', ns.name], check=False)


@pytest.fixture
def state_dir(tmp_path):
    return tmp_path / 'state'


@pytest.fixture
def ns(state_dir):
    n = _make_netns(state_dir)
    try:
        yield n
    finally:
        _destroy(n)


@pytest.fixture
def ns2(state_dir):
    n = _make_netns(state_dir)
    try:
        yield n
    finally:
        _destroy(n)


def _opposite(values: dict[str, str]) -> dict[str, str]:
    return {k: ('0' if v != '0' else '1') for k, v in values.items()}


INSTALL_FW = f'nat.Firewall("t", 3, state_dir=STATE).install({PRE!r}, {OUT!r})'
REMOVE_FW = 'nat.Firewall("t", 3, state_dir=STATE).remove()'


@pytest.mark.parametrize('preexisting', [False, True], ids=['fresh', 'with-foreign-rules'])
def test_remove_restores_ruleset(ns, preexisting):
    if preexisting:
        ns.sh('iptables -t raw -A OUTPUT -p udp --dport 9 -j ACCEPT; '
              'iptables -t raw -N OTHER; iptables -A INPUT -p tcp --dport 22 -j ACCEPT')
    before = ns.save()
    ns.run(INSTALL_FW)
    during = ns.save()
    assert 'SERVAL-t-PRE' in during and '--queue-num 3 --queue-bypass' in during
    ns.run(REMOVE_FW)
    assert ns.save() == before
    assert not list(ns.state_dir.glob('*.json'))


def test_install_twice_is_idempotent_and_jumps_first(ns):
    ns.sh('iptables -t raw -A PREROUTING -p udp --dport 9 -j ACCEPT')
    ns.run(INSTALL_FW)
    once = ns.save()
    ns.run(INSTALL_FW)
    assert ns.save() == once
    pre = [ln for ln in ns.sh('iptables -t raw -S PREROUTING').splitlines() if ln.startswith('-A')]
    assert pre[0] == '-A PREROUTING -m mark ! --mark 0x5e7a1 -m comment --comment "serval:t" -j SERVAL-t-PRE'
    assert sum('SERVAL-t-PRE' in ln for ln in pre) == 1
    out = ns.sh('iptables -t raw -S OUTPUT')
    assert out.count('-j SERVAL-t-OUT') == 1


def test_marked_packets_never_enter_the_chains(ns):
    ns.run(INSTALL_FW)
    for hook, chain, n in (('PREROUTING', 'SERVAL-t-PRE', len(PRE)), ('OUTPUT', 'SERVAL-t-OUT', len(OUT))):
        jumps = [ln for ln in ns.sh(f'iptables -t raw -S {hook}').splitlines() if chain in ln]
        assert jumps == [f'-A {hook} -m mark ! --mark 0x5e7a1 -m comment --comment "serval:t" -j {chain}']
        rules = [ln for ln in ns.sh(f'iptables -t raw -S {chain}').splitlines() if ln.startswith('-A')]
        assert len(rules) == n
        assert all(r.endswith('-j NFQUEUE --queue-num 3 --queue-bypass') for r in rules)


def test_reinstall_replaces_rules(ns):
    ns.run(INSTALL_FW)
    ns.run('nat.Firewall("t", 3, bypass=False, state_dir=STATE).install([["-p", "tcp"]], [])')
    rules = ns.sh('iptables -t raw -S SERVAL-t-PRE')
    assert rules.count('NFQUEUE') == 1 and '--queue-bypass' not in rules
    assert 'NFQUEUE' not in ns.sh('iptables -t raw -S SERVAL-t-OUT')


def test_failed_install_is_atomic_and_clear(ns):
    before = ns.save()
    p = ns.py('nat.Firewall("t", 0, state_dir=STATE).install([["-p", "bogusproto"]], [])')
    assert p.returncode != 0
    assert 'FirewallError' in p.stderr and 'iptables-restore' in p.stderr and 'bogusproto' in p.stderr
    assert ns.save() == before
    assert not list(ns.state_dir.glob('*.json'))


def _crash_install(ns: Netns, sysctls: dict[str, str]) -> None:
    """Install everything in a child, then SIGKILL it (no chance to clean up)."""
    p = ns.popen(f'''
        import sys, time
        ic = nat.Interception(instance="t", queue=0, state_dir=STATE)
        ic.install(prerouting={PRE!r}, output={OUT!r}, sysctls={sysctls!r}, routes=[{ROUTE!r}])
        print("ready", flush=True)
        time.sleep(60)
    ''')
    line = p.stdout.readline()
    assert line.strip() == 'ready', p.stderr.read() if p.poll() is not None else line
    p.send_signal(signal.SIGKILL)
    p.wait()


def test_crash_then_cleanup_restores_everything(ns):
    before = (ns.save(), ns.sysctls(), ns.routes())
    want = _opposite(before[1])
    _crash_install(ns, want)
    assert 'SERVAL-t-PRE' in ns.save() and ns.sysctls() == want
    assert '198.18.0.0/16 dev sv0' in ns.routes()
    state = json.loads(next(ns.state_dir.glob('t.net*.json')).read_text())
    assert len(state['sysctls']) == len(SYSCTL_NAMES) and state['routes'] == [ROUTE]

    ns.run('nat.cleanup("t", STATE)')
    assert (ns.save(), ns.sysctls(), ns.routes()) == before
    assert not list(ns.state_dir.glob('*.json'))


def test_crash_then_restart_and_remove(ns):
    """The daemon's own restart path: install() cleans the crashed run up first."""
    before = (ns.save(), ns.sysctls(), ns.routes())
    want = _opposite(before[1])
    _crash_install(ns, want)
    ns.run(f'''
        ic = nat.Interception(instance="t", queue=0, state_dir=STATE)
        ic.install(prerouting={PRE!r}, output={OUT!r}, sysctls={want!r}, routes=[{ROUTE!r}])
        ic.install(prerouting={PRE!r}, output={OUT!r}, sysctls={want!r}, routes=[{ROUTE!r}])
        ic.remove()
    ''')
    assert (ns.save(), ns.sysctls(), ns.routes()) == before


def test_routes_identical_route_is_not_owned(ns):
    ns.sh('ip route add 198.18.0.0/16 dev sv0 src 198.19.2.1')
    before = ns.routes()
    out = ns.run(f'''
        r = nat.OwnedRoutes("t", STATE)
        print(r.add(**{ROUTE!r}))
        r.remove()
    ''')
    assert out.strip() == 'False' and ns.routes() == before


def test_routes_gateway_and_conflict(ns):
    before = ns.routes()
    out = ns.run('''
        r = nat.OwnedRoutes("t", STATE)
        print(r.add(dst="198.18.0.0/16", gateway="198.19.2.9"))
        try:
            r.add(dst="198.18.0.0/16", dev="sv1")
        except nat.RouteError as e:
            print("conflict:", e)
    ''')
    assert out.startswith('True\nconflict:')
    assert '198.18.0.0/16 via 198.19.2.9 dev sv0' in ns.routes()
    ns.run('nat.OwnedRoutes("t", STATE).remove()')
    assert ns.routes() == before


def test_state_files_are_per_namespace(ns, ns2):
    before2 = ns2.save()
    for n in (ns, ns2):
        n.run(f'nat.Interception("t", 0, STATE).install({PRE!r}, {OUT!r}, '
              f'sysctls={{"net.ipv4.ip_forward": "1"}}, routes=[{ROUTE!r}])')
    assert len(list(ns.state_dir.glob('t.net*.json'))) == 2
    ns.run('nat.cleanup("t", STATE)')
    assert len(list(ns.state_dir.glob('t.net*.json'))) == 1
    assert 'SERVAL-t-PRE' in ns2.save() and '198.18.0.0/16' in ns2.routes()
    ns2.run('nat.cleanup_all(STATE)')
    assert ns2.save() == before2 and not list(ns.state_dir.glob('*.json'))


def test_cleanup_all_removes_every_serval_chain(ns):
    ns.sh('iptables -t raw -A OUTPUT -p udp --dport 9 -j ACCEPT; '
          'iptables -t mangle -A FORWARD -p udp -j ACCEPT')
    before = ns.save()
    ns.run(f'''
        nat.Firewall("a", 0, state_dir=STATE).install({PRE!r}, [])
        nat.Firewall("b", 1, state_dir=STATE).install([], {OUT!r})
    ''')
    ns.sh('iptables -t mangle -N SERVAL-x-FWD; iptables -t mangle -A FORWARD -j SERVAL-x-FWD; '
          'iptables -t mangle -A FORWARD -m comment --comment serval:x -j ACCEPT')
    ns.run('nat.cleanup_all(STATE)')
    assert ns.save() == before
