"""State file, sysctl bookkeeping and route ownership, against fakes (no root)."""
import errno
import json
import os

import pytest

from nat.routes import OwnedRoutes, RouteError, resolve
from nat.state import StateFile, netns_cookie, netns_id, state_files
from nat.sysctl import Sysctls, sysctl_relpath


def test_state_file_name_has_tag_and_netns(tmp_path):
    sf = StateFile('my gw', tmp_path)
    assert sf.path == tmp_path / f'my_gw.net{netns_id()}.json'
    assert netns_id() == os.stat('/proc/self/ns/net').st_ino


def test_state_file_sections_and_removal(tmp_path):
    sf = StateFile('c', tmp_path / 'deep')
    assert sf.load() == {} and not sf.path.exists()
    sf.update('routes', lambda s: (s or []) + [{'dst': '198.18.0.0/16'}])
    sf.update('sysctls', lambda s: {'a': '0'})
    assert json.loads(sf.path.read_text()) == {
        'routes': [{'dst': '198.18.0.0/16'}], 'sysctls': {'a': '0'}, 'instance': 'c', 'netns': netns_cookie()}
    assert state_files(tmp_path / 'deep') == [sf.path]
    sf.update('routes', lambda s: [])
    assert sf.get('routes') is None and sf.path.exists()
    sf.update('sysctls', lambda s: None)
    assert not sf.path.exists() and not list((tmp_path / 'deep').iterdir())  # no temp files left


def test_a_state_file_of_an_earlier_namespace_with_the_same_inode_reads_empty(tmp_path):
    """Namespace inodes are reused once a namespace is deleted; its cookie is not. What an
    earlier namespace recorded was undone with it and must not be acted on here."""
    assert isinstance(netns_cookie(), int)
    sf = StateFile('c', tmp_path)
    sf.update('routes', lambda s: [{'dst': '198.18.0.0/16'}])
    assert sf.get('routes') == [{'dst': '198.18.0.0/16'}]
    data = json.loads(sf.path.read_text())
    sf.path.write_text(json.dumps({**data, 'netns': netns_cookie() + 1}))
    assert sf.load() == {}
    sf.path.write_text(json.dumps({k: v for k, v in data.items() if k != 'netns'}))   # an older version's
    assert sf.get('routes') == [{'dst': '198.18.0.0/16'}]


def test_state_file_corrupt_is_a_clear_error(tmp_path):
    sf = StateFile('c', tmp_path)
    sf.path.write_text('{not json')
    with pytest.raises(ValueError, match='corrupt state file'):
        sf.load()


@pytest.mark.parametrize('name, rel', [
    ('net.ipv4.ip_forward', 'net/ipv4/ip_forward'),
    ('net.ipv4.conf.eth0/100.rp_filter', 'net/ipv4/conf/eth0.100/rp_filter'),
    ('/proc/sys/net/ipv4/conf/all/rp_filter', 'net/ipv4/conf/all/rp_filter'),
])
def test_sysctl_relpath(name, rel):
    assert sysctl_relpath(name) == rel


@pytest.mark.parametrize('bad', ['net..x', 'net.ipv4.conf.../..', '/proc/sys/../../etc/passwd', ''])
def test_sysctl_relpath_rejects(bad):
    with pytest.raises(ValueError):
        sysctl_relpath(bad)


@pytest.fixture
def proc(tmp_path):
    root = tmp_path / 'proc'
    for rel, v in {'net/ipv4/ip_forward': '0', 'net/ipv4/conf/all/rp_filter': '2',
                   'net/ipv4/conf/eth1/rp_filter': '1', 'net/ipv4/conf/eth1/accept_local': '1'}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(v + '\n')
    return root


def test_sysctls_set_records_originals_once_and_restores(tmp_path, proc):
    s = Sysctls('c', tmp_path / 'st', proc_root=proc)
    want = {'net.ipv4.ip_forward': 1, 'net.ipv4.conf.all.rp_filter': '0',
            'net.ipv4.conf.eth1.rp_filter': 0, 'net.ipv4.conf.eth1.accept_local': 1}
    s.set(want)
    assert {k: s.read(k) for k in want} == {k: str(v) for k, v in want.items()}
    saved = s.state.get('sysctls')
    assert saved == {'net/ipv4/ip_forward': '0', 'net/ipv4/conf/all/rp_filter': '2',
                     'net/ipv4/conf/eth1/rp_filter': '1'}  # accept_local was already 1
    s.set({'net.ipv4.ip_forward': 1})  # a second set must not record our own value
    Sysctls('c', tmp_path / 'st', proc_root=proc).set({'net.ipv4.ip_forward': '0'})
    assert s.state.get('sysctls')['net/ipv4/ip_forward'] == '0'
    s.restore()
    assert s.read('net.ipv4.ip_forward') == '0' and s.read('net.ipv4.conf.all.rp_filter') == '2'
    assert s.read('net.ipv4.conf.eth1.rp_filter') == '1' and not s.state.path.exists()


def test_sysctls_restore_skips_vanished_device(tmp_path, proc):
    s = Sysctls('c', tmp_path / 'st', proc_root=proc)
    s.set({'net.ipv4.conf.eth1.rp_filter': '0', 'net.ipv4.ip_forward': '1'})
    (proc / 'net/ipv4/conf/eth1/rp_filter').unlink()
    (proc / 'net/ipv4/conf/eth1/accept_local').unlink()
    (proc / 'net/ipv4/conf/eth1').rmdir()
    s.restore()
    assert s.read('net.ipv4.ip_forward') == '0' and not s.state.path.exists()


# --- routes against a fake pyroute2 IPRoute ------------------------------------------

def netlink_error(code, text):
    from pyroute2 import NetlinkError
    return NetlinkError(code, text)


class FakeIPRoute:
    def __init__(self, table):
        self.table = table  # shared list of route dicts, as the kernel dump shows them

    def __enter__(self):
        return self

    def __exit__(self, *a):
        pass

    def link_lookup(self, ifname):
        return {'eth1': [3], 'eth2': [4]}.get(ifname, [])

    @staticmethod
    def _msg(kw):
        dst, dst_len = kw['dst'].split('/')
        return {'dst': None if dst_len == '0' else dst, 'dst_len': int(dst_len),
                'table': kw.get('table', 254), **{k: kw[k] for k in ('oif', 'gateway', 'prefsrc') if k in kw}}

    def route(self, cmd, **kw):
        if cmd == 'dump':
            return list(self.table)
        msg = self._msg(kw)
        key = lambda m: (m['dst'], m['dst_len'], m['table'])
        if cmd == 'add':
            if any(key(m) == key(msg) for m in self.table):
                raise netlink_error(errno.EEXIST, 'File exists')
            self.table.append(msg)
        elif cmd == 'del':
            if msg not in self.table:
                raise netlink_error(errno.ESRCH, 'No such process')
            self.table.remove(msg)
        return []


@pytest.fixture
def kernel():
    return []


@pytest.fixture
def routes(tmp_path, kernel):
    pytest.importorskip('pyroute2')
    return OwnedRoutes('c', tmp_path, iproute=lambda: FakeIPRoute(kernel))


def test_resolve_dev_and_dst():
    ipr = FakeIPRoute([])
    kw = resolve(ipr, {'dst': '198.18.1.2/16', 'dev': 'eth1', 'prefsrc': '198.19.2.1'})
    assert kw == {'dst': '198.18.0.0/16', 'oif': 3, 'prefsrc': '198.19.2.1', 'family': 2}
    assert resolve(ipr, {'dst': 'default', 'gateway': '198.19.2.9'})['dst'] == '0.0.0.0/0'
    assert resolve(ipr, {'dst': '198.19.3.2'})['dst'] == '198.19.3.2/32'
    with pytest.raises(RouteError, match='eth9'):
        resolve(ipr, {'dst': '198.18.0.0/16', 'dev': 'eth9'})


def test_routes_add_records_and_remove_deletes(routes, kernel):
    assert routes.add(dst='198.18.0.0/16', dev='eth1', prefsrc='198.19.2.1') is True
    assert routes.add(dst='default', gateway='198.19.2.9') is True
    assert len(kernel) == 2 and len(routes.state.get('routes')) == 2
    assert routes.add(dst='198.18.0.0/16', dev='eth1', prefsrc='198.19.2.1') is False  # identical
    assert len(routes.state.get('routes')) == 2
    routes.remove()
    assert kernel == [] and not routes.state.path.exists()


def test_routes_identical_foreign_route_is_left_alone(routes, kernel):
    kernel.append({'dst': '198.18.0.0', 'dst_len': 16, 'table': 254, 'oif': 3})
    assert routes.add(dst='198.18.0.0/16', dev='eth1') is False
    routes.remove()
    assert len(kernel) == 1


def test_routes_conflict_is_an_error_and_not_recorded(routes, kernel):
    kernel.append({'dst': '198.18.0.0', 'dst_len': 16, 'table': 254, 'oif': 4})
    with pytest.raises(RouteError, match='different route'):
        routes.add(dst='198.18.0.0/16', dev='eth1')
    assert routes.state.get('routes') is None


def test_routes_remove_forgets_routes_already_gone(routes, kernel):
    routes.add(dst='198.18.0.0/16', dev='eth1')
    routes.add(dst='198.17.0.0/16', dev='eth2')
    kernel.clear()  # e.g. the device went away and took them along
    routes.remove()
    assert not routes.state.path.exists()
