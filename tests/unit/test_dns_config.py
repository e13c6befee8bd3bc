"""Resolver config: defaults, the example file, errors that name file:line."""
from pathlib import Path

import pytest

from dns_resolver.config import ConfigError, load, resolv_conf_servers
from dns_resolver.daemon import upstream_servers

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, text):
    path = tmp_path / "dns.toml"
    path.write_text(text)
    return str(path)


def test_example_config_loads():
    cfg = load(str(REPO / "deploy" / "dns.toml"))
    assert cfg.listen == [("198.19.1.1", 53), ("127.0.0.1", 53)]
    assert [z.name for z in cfg.zones] == ["svc.example"]
    assert [s.name for s in cfg.services] == ["web.svc.example", "api.svc.example", "db.svc.example"]
    assert cfg.services[0].ports == (80,)
    assert cfg.upstreams == [("198.19.4.2", 53), ("198.19.4.3", 53)]
    assert cfg.mappings and cfg.gateway_control


def test_defaults(tmp_path):
    cfg = load(write(tmp_path, ""))
    assert cfg.listen == [("127.0.0.1", 53)]
    assert cfg.allow == ["127.0.0.0/8", "::1/128"]          # no open recursion by default
    assert cfg.rate == 2000 and cfg.burst == 4000 and cfg.slip == 1   # see docs/resolver.md
    assert cfg.virtual_network == "198.18.0.0/16"
    assert not cfg.upstreams_configured and not cfg.zones


def test_listen_forms_and_full_service_names(tmp_path):
    cfg = load(write(tmp_path, """
[server]
listen = ["198.19.1.1", "127.0.0.1:5353", "[::1]:53"]
port = 5300
[[zone]]
name = "Svc.Example."
[[zone.service]]
name = "web"
[[zone.service]]
name = "api.svc.example."
address = "198.18.3.3"
[[service]]
name = "db.svc.example"
"""))
    assert cfg.listen == [("198.19.1.1", 5300), ("127.0.0.1", 5353), ("::1", 53)]
    assert [s.name for s in cfg.services] == ["web.svc.example", "api.svc.example", "db.svc.example"]
    assert cfg.services[1].address == "198.18.3.3"


@pytest.mark.parametrize("text,line,message", [
    ("[server]\nport = 70000\n", 2, "1 to 65535"),
    ("[server]\n\nlisten = [\"nowhere\"]\n", 3, "not an IP address"),
    ("[cache]\nsize = 1\nbogus = 2\n", 3, "unknown key 'bogus'"),
    ("[nonsense]\n", 1, "unknown section"),
    ("[[zone]]\nname = \"svc.example\"\n[[zone.service]]\nname = \"ok\"\n[[zone.service]]\nname = \"bad name\"\n", 6,
     "not a valid service name"),
    ("[[zone]]\nname = \"svc.example\"\n[[service]]\nname = \"web.other.example\"\n", 4, "under no [[zone]]"),
    ("[[zone]]\nname = \"svc.example\"\nttl = 600\n[virtual]\nreclaim_after = 60\n", 5, "below zone"),
    ("[virtual]\nnetwork = \"198.18.0.0/16\"\n[[zone]]\nname = \"svc.example\"\n[[zone.service]]\nname = \"a\"\n"
     "address = \"10.1.1.1\"\n", 7, "outside the virtual network"),
    ("[[zone]]\nname = \"svc.example\"\n[[zone.service]]\nname = \"a\"\n[[service]]\nname = \"a.svc.example\"\n", 6,
     "listed twice"),
    ("[upstream]\ntimeout = \"fast\"\n", 2, "expected a number"),
    ("[server]\nallow = [\"198.19.1.0/33\"]\n", 2, "not a network"),
    ("[server\n", 1, "not valid TOML"),
])
def test_errors_name_file_and_line(tmp_path, text, line, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value).startswith(f"{path}:{line}: "), str(info.value)
    assert message in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path / "nope.toml"))


def test_upstreams_from_resolv_conf_without_ourselves(tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# comment\nsearch lan\nnameserver 198.19.4.2\nnameserver 127.0.0.1\n"
                      "nameserver fe80::1%eth0\nnameserver 198.19.4.2\noptions ndots:1\n")
    assert resolv_conf_servers(str(resolv)) == [("198.19.4.2", 53), ("127.0.0.1", 53), ("fe80::1", 53)]
    cfg = load(write(tmp_path, f'[server]\nlisten = ["0.0.0.0"]\n[upstream]\nresolv_conf = "{resolv}"\n'))
    servers, source = upstream_servers(cfg)
    assert servers == [("198.19.4.2", 53), ("fe80::1", 53)] and source == str(resolv)   # not 127.0.0.1: us


def test_empty_servers_means_no_forwarding(tmp_path):
    cfg = load(write(tmp_path, "[upstream]\nservers = []\n"))
    assert upstream_servers(cfg) == ([], "config")
