"""fast_path_redirect = "auto": what a redirected packet would skip here, read from
what iptables-save and nft print, and the running gateway following it."""
import logging

import pytest
from twisted.internet.defer import fail, succeed

from gateway.config import ConfigError, load
from gateway.daemon import Gateway, redirect_said
from gateway.fastpath.host_filters import foreign_rules, native_nft_tables
from nat.firewall import parse_save
from tests.unit import gateway_fakes as fakes
from tests.unit.test_udp_flows import CLIENT_TOML

OURS = """*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:SERVAL-client-PRE - [0:0]
:SERVAL-server-PRE - [0:0]
-A PREROUTING -m mark ! --mark 0x5e7a1 -m comment --comment "serval:client" -j SERVAL-client-PRE
-A PREROUTING -m mark ! --mark 0x5e7a1 -m comment --comment "serval:server" -j SERVAL-server-PRE
-A SERVAL-client-PRE -p tcp -j NFQUEUE --queue-num 0
COMMIT
"""


def test_the_gateways_own_chains_and_jumps_are_nothing_to_skip():
    assert foreign_rules(parse_save(OURS)) == []


def test_other_rules_and_dropping_policies_are():
    nat = "*nat\n:POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -o eth0 -j MASQUERADE\nCOMMIT\n"
    drop = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\nCOMMIT\n"
    raw = OURS.replace("COMMIT", "-A PREROUTING -p udp --dport 9 -j ACCEPT\nCOMMIT")
    assert foreign_rules(parse_save(OURS + nat)) == ["1 iptables rule(s) in table nat"]
    assert foreign_rules(parse_save(OURS + drop)) == ["policy DROP on filter FORWARD"]
    assert foreign_rules(parse_save(raw)) == ["1 iptables rule(s) in table raw"]


def test_nft_tables_of_their_own_count_and_iptables_nft_ones_do_not():
    listing = {"nftables": [{"metainfo": {"version": "1.0.6"}},
                            {"table": {"family": "ip", "name": "raw", "handle": 1}},
                            {"table": {"family": "inet", "name": "filter", "handle": 2}}]}
    assert native_nft_tables(listing, {"raw"}) == ["nftables table inet filter"]
    assert native_nft_tables(listing, set()) == ["nftables table ip raw", "nftables table inet filter"]
    assert native_nft_tables({"nftables": []}, {"raw"}) == []


def test_the_log_line_says_why():
    assert redirect_said(True, [], True) == ("fast path redirect on (this namespace has no packet filters "
                                             "but the gateways' own): translated packets go straight to "
                                             "their next hop")
    off = redirect_said(False, ["1 iptables rule(s) in table nat", "IPsec (xfrm) policies"], True)
    assert off.startswith("fast path redirect off (1 iptables rule(s) in table nat; IPsec (xfrm) policies)")
    assert "fast_path_redirect = false" in redirect_said(False, [], False)


@pytest.mark.parametrize("value, expected", [(None, "auto"), ('"auto"', "auto"), ("true", True),
                                             ("false", False)])
def test_config_takes_auto_true_or_false(tmp_path, value, expected):
    path = tmp_path / "c.toml"
    path.write_text(CLIENT_TOML.replace("[gateway]\n", "[gateway]\n" + (
        f"fast_path_redirect = {value}\n" if value else ""), 1))
    assert load(str(path), "client").fast_path_redirect == expected


@pytest.mark.parametrize("value", ['"yes"', "1"])
def test_config_refuses_anything_else_with_its_line(tmp_path, value):
    path = tmp_path / "c.toml"
    path.write_text(CLIENT_TOML.replace("[gateway]\n", f"[gateway]\nfast_path_redirect = {value}\n", 1))
    with pytest.raises(ConfigError, match=r'c.toml:2: .*fast_path_redirect must be "auto", true or false'):
        load(str(path), "client")


class FastPath:
    def __init__(self, redirect):
        self.redirect, self.changes, self.stopped = redirect, [], False

    def set_redirect(self, on):
        self.redirect = on
        self.changes.append(on)

    def handle(self, events):
        pass

    def refresh_all(self):
        pass

    def sweep(self):
        return 0

    def stop(self):
        self.stopped = True


def running_gateway(tmp_path, surveys, redirect_line=""):
    """A client gateway on the fakes with a fast path started with redirect on; each
    survey answers the next of ``surveys`` (a list of findings, or an exception)."""
    path = tmp_path / "client.toml"
    path.write_text(CLIENT_TOML.replace("[gateway]\n", f'[gateway]\ncontrol_socket = "{tmp_path}/c.sock"\n'
                                        f'state_dir = "{tmp_path}"\n{redirect_line}', 1))
    reactor = fakes.Reactor()
    a = fakes.adapters(fakes.Net({"198.19.2.1": "eth0"}, [("198.19.2.0/24", "198.19.2.1", "eth0")], {"eth0"}),
                       reactor)
    fp = FastPath(True)
    a.fast_path = lambda cfg, translator, interfaces: fp
    answers = iter(surveys)

    def survey():
        answer = next(answers)
        return fail(answer) if isinstance(answer, Exception) else succeed(answer)
    a.host_filters = survey
    gw = Gateway(load(str(path), "client"), reactor, a)
    gw.start()
    return gw, fp, reactor


def test_a_rule_added_later_turns_redirect_off_at_the_next_survey_and_back(tmp_path, caplog):
    from gateway.fastpath.host_filters import SURVEY_EVERY
    caplog.set_level(logging.INFO, logger="serval")
    gw, fp, reactor = running_gateway(tmp_path, [[], ["1 iptables rule(s) in table nat"], []])
    try:
        reactor.advance(SURVEY_EVERY)
        assert fp.changes == []                       # nothing found, nothing changed
        reactor.advance(SURVEY_EVERY)
        assert fp.changes == [False]
        assert any("fast path redirect off (1 iptables rule(s) in table nat)" in r.getMessage()
                   for r in caplog.records)
        gw.reload()                                   # SIGHUP looks again at once
        assert fp.changes == [False, True]
    finally:
        gw.stop()
    assert gw.redirect_survey is None and fp.stopped


def test_a_survey_that_fails_changes_nothing_and_is_logged(tmp_path, caplog):
    from gateway.fastpath.host_filters import SURVEY_EVERY
    gw, fp, reactor = running_gateway(tmp_path, [OSError("iptables-save: not found"), []])
    try:
        reactor.advance(SURVEY_EVERY)
        assert fp.changes == [] and fp.redirect
        assert any("surveying this host's packet filters failed, redirect stays on" in r.getMessage()
                   for r in caplog.records)
        reactor.advance(SURVEY_EVERY)                 # and the next one runs
        assert fp.changes == []
    finally:
        gw.stop()


def test_with_redirect_set_in_the_config_nothing_is_surveyed(tmp_path):
    gw, fp, reactor = running_gateway(tmp_path, [], "fast_path_redirect = true\n")
    try:
        assert gw.redirect_survey is None
        gw.survey_host_filters()                      # would raise StopIteration if it surveyed
        assert fp.changes == []
    finally:
        gw.stop()


def test_a_tool_that_fails_counts_as_something_found():
    from gateway.fastpath.host_filters import survey
    found = survey("no-such-iptables")
    assert found[0].startswith("no-such-iptables-save failed (")
    assert found[-1].startswith("no-such-iptables -V failed (")
