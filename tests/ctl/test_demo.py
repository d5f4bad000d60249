"""``python -m policyd.demo``: the state directory ``make run`` starts from."""

from __future__ import annotations

import io

import pytest

from policyd import config as config_module
from policyd import demo
from policyd.core.chain import decide
from policyd.store import open_backend
from policyd.core.verdict import Query, Verdict


def test_demo_writes_config_and_store_once(tmp_path):
    """The first run writes a valid configuration with absolute paths under the state
    directory and loads the demo data; the second run changes nothing."""
    state = tmp_path / "state"
    out = io.StringIO()
    assert demo.run(str(state), out) == 0
    first = out.getvalue()
    assert "configuration: " in first and "(written)" in first
    assert "demo data: loaded" in first
    config = config_module.load(state / "policyd.conf")
    assert config.store.url == f"sqlite:///{state / 'policyd.sqlite'}"
    assert config.store.refresh_interval == 2
    assert config.daemon.state_dir == state
    assert config.daemon.control_socket == state / "control.sock"
    assert config.daemon.control_socket_mode == 0o600
    # Issue 13: Unix sockets only, mode 0660, unless --tcp.
    assert config.exim.listen == (f"unix:{state}/exim.sock:mode=660",)
    assert config.postfix.listen == (f"unix:{state}/postfix.sock:mode=660",)
    conf_text = (state / "policyd.conf").read_text()
    backend = open_backend(config.store)
    try:
        token = backend.change_token()
        out = io.StringIO()
        assert demo.run(str(state), out) == 0
        assert "(exists, kept)" in out.getvalue()
        assert "left unchanged" in out.getvalue()
        assert backend.change_token() == token
    finally:
        backend.close()
    assert (state / "policyd.conf").read_text() == conf_text


def test_demo_keeps_an_existing_configuration(tmp_path):
    """An existing policyd.conf is used as it is, store URL included."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "policyd.conf").write_text(
        f"[store]\nurl = sqlite:///{tmp_path / 'elsewhere.sqlite'}\n")
    assert demo.run(str(state), io.StringIO()) == 0
    assert (tmp_path / "elsewhere.sqlite").exists()
    assert not (state / "policyd.sqlite").exists()


def test_demo_refuses_whitespace_in_the_state_dir(tmp_path, capsys):
    """Listen endpoint strings are whitespace-separated: such a directory is an error."""
    assert demo.main(["--state-dir", str(tmp_path / "with space")]) != 0
    assert "whitespace" in capsys.readouterr().err


@pytest.fixture(scope="module")
def demo_snapshot(tmp_path_factory):
    state = tmp_path_factory.mktemp("demo")
    demo.run(str(state), io.StringIO())
    backend = open_backend(config_module.load(state / "policyd.conf").store)
    try:
        yield backend.load_snapshot()
    finally:
        backend.close()


@pytest.mark.parametrize("recipient,sender,from_header,expected", demo.EXAMPLES)
def test_demo_data_decisions(demo_snapshot, recipient, sender, from_header, expected):
    """load_snapshot + decide on the demo data give the documented verdicts."""
    decision = decide(demo_snapshot, Query(recipient, sender, from_header))
    assert decision.verdict is Verdict(expected), decision


def test_demo_data_has_what_make_run_promises(demo_snapshot):
    """Two lists, a few members, a moderated member, a user with two addresses, a
    nonmember pattern and a ban, on a domain with an alias."""
    lists = demo_snapshot.lists
    assert set(lists) == {demo.ANNOUNCE, demo.DISCUSS}
    discuss = lists[demo.DISCUSS]
    assert len(discuss.members) >= 4
    assert discuss.find_member("dave@example.com")[1] is not None
    assert discuss.find_member("alice@home.example") == ("alice@example.com", None)
    assert any(patterns for _, patterns in discuss.nonmember_patterns)
    assert discuss.bans.match("troll@example.net")
    assert lists[demo.ANNOUNCE].rejection_notice
    assert demo_snapshot.domains["lists.example.net"] == "lists.example.org"


def test_demo_listens_on_tcp_only_when_asked(tmp_path):
    """``--tcp`` adds the loopback TCP listeners (issue 13: not by default)."""
    state = tmp_path / "state"
    assert demo.run(str(state), io.StringIO(), tcp=True) == 0
    config = config_module.load(state / "policyd.conf")
    assert config.exim.listen == (f"unix:{state}/exim.sock:mode=660",
                                  "tcp:10041:interface=127.0.0.1")
    assert config.postfix.listen == (f"unix:{state}/postfix.sock:mode=660",
                                     "tcp:10040:interface=127.0.0.1")
