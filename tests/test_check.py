"""``policyd --check-config`` (``policyd.check``): what start-up and the first answers
would hit is reported now, each problem naming its key; exit 0 only when start-up would
succeed.  The template and endpoint checks also stop start-up (``tap.load_config``)."""

from __future__ import annotations

import io

import pytest

from policyd import daemon
from policyd.check import PLACEHOLDERS, check_config
from policyd.config import ConfigError
from policyd.core.replies import ReplyPolicy
from policyd.core.verdict import Decision, Role, Verdict
from policyd.tap import load_config


def write(tmp_path, text: str = "", *, exim="unix:exim.sock", store=None) -> str:
    store = store or f"sqlite:///{tmp_path}/policyd.sqlite"
    path = tmp_path / "policyd.conf"
    path.write_text(
        f"[store]\nurl = {store}\n"
        f"[daemon]\nstate_dir = {tmp_path}\ncontrol_socket = control.sock\n"
        f"[exim]\nlisten = {exim}\n"
        "[postfix]\nlisten = tcp:10040:interface=127.0.0.1\n" + text)
    return str(path)


def run(path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = check_config(path, out, err)
    return status, out.getvalue(), err.getvalue()


def test_a_good_file_is_ok(tmp_path):
    status, out, err = run(write(tmp_path))
    assert (status, err) == (0, "") and out.endswith("configuration OK\n")


def test_unknown_placeholder_names_the_key_and_the_allowed_ones(tmp_path):
    """The issue's ``{lst}``: at runtime every rejection became the error 4xx."""
    status, out, err = run(write(tmp_path, "[smtp]\nreject_text = Posting to {lst} "
                                           "refused\n"))
    assert status == 2
    assert ("[smtp] reject_text = 'Posting to {lst} refused': unknown placeholder {lst} "
            "(allowed: {list}, {recipient}, {sender}, {rule})") in err
    assert "configuration OK" not in out


@pytest.mark.parametrize("key", ["unknown_list_text", "null_sender_text",
                                 "discard_reject_text", "defer_text"])
def test_every_template_is_rendered(tmp_path, key):
    status, _, err = run(write(tmp_path, f"[smtp]\n{key} = x {{0}} {{nope}}\n"))
    assert status == 2 and f"[smtp] {key} = " in err


def test_a_lone_brace_is_reported(tmp_path):
    status, _, err = run(write(tmp_path, "[smtp]\ndefer_text = try {later\n"))
    assert status == 2 and "[smtp] defer_text" in err and "{{" in err


def test_placeholders_are_what_the_reply_policy_fills():
    """Each allowed placeholder renders in every template (the list stays in step with
    ``ReplyPolicy._reply``)."""
    template = " ".join("{" + name + "}" for name in PLACEHOLDERS)
    policy = ReplyPolicy(reject_text=template)
    decision = Decision(Verdict.REJECT, "nonmember-moderation", "", None, "s@example.net",
                        "l@example.org", Role.POST)
    assert policy._reply(decision).text == "l@example.org l@example.org s@example.net " \
                                           "nonmember-moderation"


def test_tcp_port_out_of_range_fails(tmp_path):
    status, _, err = run(write(tmp_path, exim="tcp:99999"))
    assert status == 2 and "[exim] listen = tcp:99999: port 99999 is out of range" in err


def test_systemd_listener_is_accepted_with_a_note(tmp_path, monkeypatch):
    """Valid outside systemd too: its descriptors exist only when systemd starts
    policyd.  A malformed one is still an error."""
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    status, out, err = run(write(tmp_path, exim="systemd:domain=UNIX:name=exim"))
    assert status == 0, err
    assert "note: [exim] listen = systemd:domain=UNIX:name=exim: a socket passed by " \
           "systemd" in out
    status, _, err = run(write(tmp_path, exim="systemd:domain=UNIX"))
    assert status == 2 and "exactly one of index= and name=" in err


@pytest.mark.parametrize("url, words", [
    ("notaurl", "[store] url: bad store URL 'notaurl'"),
    ("postgresql+nosuchdriver://h/db", "no driver for it"),
])
def test_store_url_is_parsed_and_its_driver_imported(tmp_path, url, words):
    status, _, err = run(write(tmp_path, store=url))
    assert status == 2 and words in err


def test_several_problems_are_all_reported(tmp_path):
    status, _, err = run(write(tmp_path, "[smtp]\nreject_text = {lst}\n",
                               exim="tcp:99999", store="notaurl"))
    assert status == 2 and "3 problems: policyd would not start" in err


def test_start_up_refuses_what_the_check_refuses(tmp_path):
    """The daemon does not start with a template that would fail every rejection."""
    with pytest.raises(ConfigError, match=r"unknown placeholder \{lst\}"):
        load_config(write(tmp_path, "[smtp]\nreject_text = {lst}\n"))
    with pytest.raises(ConfigError, match="port 99999 is out of range"):
        load_config(write(tmp_path, exim="tcp:99999"))


def test_policyd_check_config_exit_status(tmp_path, capsys):
    assert daemon.main(["--check-config", "--config", write(tmp_path)], environ={}) == 0
    assert "configuration OK" in capsys.readouterr().out
    bad = write(tmp_path, "[smtp]\nreject_text = {lst}\n")
    assert daemon.main(["--check-config", "--config", bad], environ={}) == 2
    assert "unknown placeholder {lst}" in capsys.readouterr().err


def test_an_unreadable_public_suffix_list_is_a_note(tmp_path):
    """dmarc-mitigation still works without the file (two labels), so a note, not an error."""
    path = write(tmp_path, f"[dmarc]\npublic_suffix_list = {tmp_path / 'missing.dat'}\n")
    out, err = io.StringIO(), io.StringIO()
    assert check_config(path, out, err) == 0
    assert "[dmarc] public_suffix_list" in out.getvalue() and "not readable" in out.getvalue()
    (tmp_path / "psl.dat").write_text("com\n")
    path = write(tmp_path, f"[dmarc]\npublic_suffix_list = {tmp_path / 'psl.dat'}\n")
    out = io.StringIO()
    assert check_config(path, out, io.StringIO()) == 0
    assert "public_suffix_list" not in out.getvalue()


def with_log_file(tmp_path, log_file: str) -> str:
    path = write(tmp_path)
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace("[daemon]\n", f"[daemon]\nlog_file = {log_file}\n"))
    return path


def test_what_start_up_refuses_on_the_file_system_the_check_refuses_too(tmp_path):
    """A metrics socket in a missing directory, a socket path too long for a Unix
    socket's address, a log file the system will not create (root passes access()):
    start-up failed with these while --check-config said OK."""
    missing = write(tmp_path, f"[metrics]\nlisten = unix:{tmp_path}/nodir/m.sock\n")
    status, _, err = run(missing)
    assert status == 2 and "[metrics] listen" in err and "does not exist" in err
    long_path = tmp_path / ("d" * 120) / "c.sock"
    status, _, err = run(write(tmp_path, exim=f"unix:{long_path}"))
    assert status == 2 and "[exim] listen" in err and "longer than the 107" in err
    status, _, err = run(with_log_file(tmp_path, "/proc/policyd.log"))
    assert status == 2 and "[daemon] log_file" in err and "cannot be created" in err
    status, _, err = run(with_log_file(tmp_path, f"{tmp_path}/p.log"))
    assert status == 0, err
    assert not (tmp_path / "p.log").exists()  # the check leaves nothing behind


def test_start_up_with_a_log_file_it_cannot_open_exits_2_without_a_traceback(
        tmp_path, capsys, monkeypatch):
    """The log file checked fine and could not be opened at start-up: a configuration
    error, exit 2 (it was reported as "cannot open the store", with a traceback)."""
    from policyd import config as config_module

    monkeypatch.setattr(config_module, "check_paths", lambda config: None)
    monkeypatch.setattr(daemon, "check_paths", lambda config: None)
    path = with_log_file(tmp_path, "/proc/policyd.log")
    assert daemon.main(["--config", path], environ={}) == 2
    err = capsys.readouterr().err
    assert "[daemon] log_file" in err and "Traceback" not in err
    assert "cannot open the store" not in err

