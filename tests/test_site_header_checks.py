"""Mailman's site ``[antispam] header_checks`` and ``jump_chain`` (``[mailman]
config_file``, ``policyd.mailman_site``): read as Mailman 3.3.10 reads ``mailman.cfg``,
carried into the snapshot, evaluated by the ``header-match`` rule before the list's
``header_matches``; a file Mailman could not use stops start-up and ``--check-config``.
The agreement with the real Mailman is in tests/mailman/test_site_header_checks.py."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest

from policyd import mailman_site
from policyd.check import check_config
from policyd.config import ConfigError, load, parse
from policyd.core.chain import decide
from policyd.core.message import parse_message
from policyd.core.snapshot import NO_SITE_CHECKS, ListSpec, build, replace_lists
from policyd.core.verdict import Action, Query, Verdict
from policyd.store import NativeBackend, open_backend

LIST = "team@lists.example.org"
STRANGER = "someone@outside.example"


def cfg(tmp_path, text, name="mailman.cfg"):
    path = tmp_path / name
    path.write_text(text)
    return path


def query(headers: str, body: str | None = None) -> Query:
    raw = f"From: {STRANGER}\nTo: {LIST}\nSubject: hi\n{headers}".encode()
    return Query(LIST, STRANGER, STRANGER, None, None,
                 message=parse_message(raw, None if body is None else body.encode()))


def snap(site, **list_settings):
    spec = ListSpec(LIST, default_member_action=Action.DEFER,
                    default_nonmember_action=Action.ACCEPT, **list_settings)
    return build([spec], site_header_checks=site)


SITE = """\
[mailman]
site_owner: postmaster@example.org

[antispam]
header_checks:
  X-Spam: (yes|maybe)
  Authentication-Results: mail.example.com; dmarc=(fail|quarantine)
jump_chain: discard
"""


def test_header_checks_are_split_as_mailman_splits_them(tmp_path):
    """Continuation lines become lines of the value (the first, empty one counts in the
    numbering, as Mailman's rule names ``header-match-config-<n>`` do); a line is split at
    its first colon, the pattern's leading white space dropped, and compiled ignoring
    case; jump_chain names the action."""
    site, notes = mailman_site.load(cfg(tmp_path, SITE))
    assert notes == []
    assert site.jump_chain is Action.DISCARD
    assert [(n, m.header, m.pattern) for n, m in site.checks] == [
        (1, "X-Spam", "(yes|maybe)"),
        (2, "Authentication-Results", "mail.example.com; dmarc=(fail|quarantine)")]
    assert site.checks[0][1].regex.search("MAYBE so")


def test_defaults_without_an_antispam_section(tmp_path):
    site, notes = mailman_site.load(cfg(tmp_path, "[mailman]\nsite_owner: a@b.example\n"))
    assert (site.checks, site.jump_chain, notes) == ((), Action.HOLD, [])


def test_bogus_lines_and_bad_patterns_are_skipped_with_a_note(tmp_path):
    """Mailman logs and skips a line without a colon; a pattern that does not compile
    never matches.  policyd does the same and says so."""
    site, notes = mailman_site.load(cfg(tmp_path, "[antispam]\nheader_checks:\n"
                                                  "  no colon here\n  X-Bad: [unclosed\n"
                                                  "  X-Good: yes\n"))
    assert [m.header for _, m in site.checks] == ["X-Bad", "X-Good"]
    assert site.checks[0][1].regex is None
    assert len(notes) == 2 and "no colon" in notes[0] and "does not compile" in notes[1]


def test_meta_extends_is_overlaid_key_by_key(tmp_path):
    """lazr.config's ``[meta] extends``: the extended file's keys, overridden by the
    extending file's."""
    cfg(tmp_path, "[antispam]\nheader_checks: X-Base: 1\njump_chain: reject\n", "base.cfg")
    site, _ = mailman_site.load(cfg(tmp_path, "[meta]\nextends: base.cfg\n"
                                              "[antispam]\njump_chain: accept\n"))
    assert site.jump_chain is Action.ACCEPT
    assert [m.header for _, m in site.checks] == ["X-Base"]


@pytest.mark.parametrize("chain, words", [
    ("moderation", "cannot be mirrored"),
    ("nonsense", "no Mailman chain"),
])
def test_a_jump_chain_policyd_cannot_take_is_an_error(tmp_path, chain, words):
    with pytest.raises(mailman_site.SiteConfigError, match=words):
        mailman_site.load(cfg(tmp_path, f"[antispam]\njump_chain: {chain}\n"))


def test_site_checks_come_first_and_jump_to_jump_chain(tmp_path):
    """A site line that matches decides with jump_chain before any list entry (here an
    accept entry that would also match), and the trace names the site line and file."""
    site, _ = mailman_site.load(cfg(tmp_path, SITE))
    snapshot = snap(site, header_matches=(("X-Spam", "yes", Action.ACCEPT),))
    decision = decide(snapshot, query("X-Spam: Yes\n"))
    assert (decision.verdict, decision.rule, decision.action) == (
        Verdict.DISCARD, "header-match", Action.DISCARD)
    assert "site header_checks line 1 (X-Spam: (yes|maybe))" in decision.reason
    assert str(tmp_path / "mailman.cfg") in decision.reason


def test_a_site_check_searches_decoded_values_in_every_part(tmp_path):
    site, _ = mailman_site.load(cfg(tmp_path, "[antispam]\nheader_checks: X-Tag: evil\n"))
    body = ("--B\nContent-Type: text/plain\n\nhi\n--B\nContent-Type: text/plain\n"
            "X-Tag: =?utf-8?q?very_EVIL?=\n\nx\n--B--\n")
    message = 'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="B"\n'
    decision = decide(snap(site), query(message, body))
    assert (decision.verdict, decision.rule) == (Verdict.HOLD, "header-match")


def test_jump_chain_is_the_action_of_list_entries_without_their_own(tmp_path):
    site, _ = mailman_site.load(cfg(tmp_path, "[antispam]\njump_chain: reject\n"))
    snapshot = snap(site, header_matches=(("X-List", "x", None),))
    decision = decide(snapshot, query("X-List: x\n"))
    assert (decision.verdict, decision.action) == (Verdict.REJECT, Action.REJECT)
    assert "header_matches #0" in decision.reason
    default = decide(snap(NO_SITE_CHECKS, header_matches=(("X-List", "x", None),)),
                     query("X-List: x\n"))
    assert default.verdict is Verdict.HOLD


def test_no_match_goes_on_down_the_chain(tmp_path):
    site, _ = mailman_site.load(cfg(tmp_path, SITE))
    decision = decide(snap(site), query("X-Spam: no\n"))
    assert decision.verdict is Verdict.ACCEPT
    step = next(s for s in decision.trace if s.rule == "header-match")
    assert not step.hit and "site header_checks" in step.detail


def test_an_incremental_refresh_keeps_the_site_checks(tmp_path):
    site, _ = mailman_site.load(cfg(tmp_path, SITE))
    snapshot = snap(site)
    again = replace_lists(snapshot, [ListSpec("other@lists.example.org")], version="2")
    assert again.site_header_checks == site


def test_config_key_reads_the_file_relative_to_the_config(tmp_path):
    cfg(tmp_path, SITE)
    config = parse("[mailman]\nconfig_file = mailman.cfg\n", base=tmp_path)
    assert config.store.site_header_checks.jump_chain is Action.DISCARD
    assert len(config.store.site_header_checks.checks) == 2
    assert parse("").store.site_header_checks == NO_SITE_CHECKS


@pytest.mark.parametrize("text, words", [
    (None, "cannot read it"),
    ("header_checks: x\n", "not a Mailman configuration file"),
    ("[antispam]\njump_chain: default-posting-chain\n", "cannot be mirrored"),
])
def test_a_bad_file_is_a_config_error_naming_the_key(tmp_path, text, words):
    if text is not None:
        cfg(tmp_path, text)
    with pytest.raises(ConfigError, match=r"\[mailman\] config_file = mailman.cfg: .*"
                       + words):
        parse("[mailman]\nconfig_file = mailman.cfg\n", base=tmp_path)


def _policyd_conf(tmp_path, mailman_cfg_text):
    if mailman_cfg_text is not None:
        cfg(tmp_path, mailman_cfg_text)
    path = tmp_path / "policyd.conf"
    path.write_text(f"[store]\nurl = sqlite:///{tmp_path}/policyd.sqlite\n"
                    f"[daemon]\nstate_dir = {tmp_path}\ncontrol_socket = control.sock\n"
                    "[exim]\nlisten = unix:exim.sock\n"
                    "[postfix]\nlisten = tcp:10040:interface=127.0.0.1\n"
                    "[mailman]\nconfig_file = mailman.cfg\n")
    out, err = io.StringIO(), io.StringIO()
    return check_config(str(path), out, err), out.getvalue(), err.getvalue()


def test_check_config_reports_a_bad_file(tmp_path):
    status, out, err = _policyd_conf(tmp_path, "[antispam]\njump_chain: holdd\n")
    assert status == 2 and "[mailman] config_file = mailman.cfg" in err
    assert "'holdd' is no Mailman chain" in err


def test_check_config_notes_what_it_read_and_what_is_skipped(tmp_path):
    status, out, err = _policyd_conf(
        tmp_path, "[antispam]\nheader_checks:\n  X-Spam: yes\n  bogus\n")
    assert status == 0, err
    assert "1 site header_checks line from" in out and "jump_chain hold" in out
    assert "has no colon" in out


def test_the_native_backend_puts_them_in_every_snapshot(tmp_path):
    """From the configuration to the daemon's snapshots: ``open_backend`` hands the
    store's backend the site checks, and its full build carries them."""
    from policyd.store import Store

    config = load(_write_conf(tmp_path))
    store = Store.from_config(config.store)
    store.upgrade()
    store.close()
    backend = open_backend(config.store)
    try:
        assert isinstance(backend, NativeBackend)
        snapshot = backend.load_snapshot()
        assert snapshot.site_header_checks == config.store.site_header_checks
        assert snapshot.site_header_checks.jump_chain is Action.DISCARD
        assert replace(snapshot, lists={}).site_header_checks.checks
    finally:
        backend.close()


def _write_conf(tmp_path):
    cfg(tmp_path, SITE)
    path = tmp_path / "policyd.conf"
    path.write_text(f"[store]\nurl = sqlite:///{tmp_path}/policyd.sqlite\n"
                    "[mailman]\nconfig_file = mailman.cfg\n")
    return path


def test_skipped_lines_are_snapshot_problems_and_stay_after_a_refresh(tmp_path):
    """What Mailman skips is reported where a list's skipped pattern is: in the
    snapshot's problems (logged at each load), kept by an incremental refresh."""
    site, notes = mailman_site.load(cfg(tmp_path, "[antispam]\nheader_checks: bogus\n"))
    snapshot = snap(site)
    assert list(snapshot.problems) == notes and "no colon" in notes[0]
    again = replace_lists(snapshot, [ListSpec(LIST)], version="2")
    assert list(again.problems) == notes


def test_the_mailman3_backend_is_given_them_too(tmp_path):
    from policyd.store.mailman3 import Mailman3Backend

    cfg(tmp_path, SITE)
    config = parse("[store]\nbackend = mailman3\nurl = sqlite:///mailman.db\n"
                   "[mailman]\nconfig_file = mailman.cfg\n", base=tmp_path)
    backend = open_backend(config.store)
    try:
        assert isinstance(backend, Mailman3Backend)
        assert backend.site_header_checks == config.store.site_header_checks
    finally:
        backend.close()
