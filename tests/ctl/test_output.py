"""What ``policyctl`` prints for people: the daemon's times and ages in ISO 8601 and human
units (``--json`` keeps the numbers), and ``import-mailman2 --quiet`` saying only news."""

from __future__ import annotations

import json
import re
import shutil
import time
from datetime import datetime

import pytest

from policyd import control_client
from policyd.ctl.daemon import duration, iso_time

from .test_ctl import Ctl

NOW = time.time()
STATUS = {
    "version": "0.1.0",
    "pid": 4242,
    "uptime": 2 * 86400 + 3 * 3600 + 59,
    "listeners": [{"kind": "exim", "key": "exim_listen", "connections": 2}],
    "counters": {"total": 7, "by_verdict": {"accept": 7}},
    "snapshot": {"version": "17.abc", "age": 192.4, "built_at": NOW - 192.4,
                 "lists": 3, "memberships": 12, "domains": 1, "problems": []},
    "unavailable_reason": None,
    "store": {"describe": "native sqlite:///x", "healthy": False,
              "last_check_age": 0.42, "last_error": "gone", "last_error_age": 3725.0,
              "failing_for": 65.0, "failed_refreshes": 4, "refresh_interval": 5.0,
              "checks": 100, "loads": 3},
}
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d")


@pytest.fixture
def daemon(capsys, tmp_path, monkeypatch) -> Ctl:
    """policyctl with a configuration, talking to a daemon that answers STATUS."""
    run = Ctl(capsys, tmp_path)
    config = tmp_path / "policyd.conf"
    config.write_text(f"[store]\nurl = {run.url}\n[daemon]\n"
                      f"control_socket = {tmp_path / 'control.sock'}\n")
    run.environ["POLICYD_CONFIG"] = str(config)
    monkeypatch.setattr(control_client, "status", lambda path, timeout=5.0: STATUS)
    monkeypatch.setattr(control_client, "reload", lambda path, timeout=5.0: {
        "reloaded": True, "snapshot": STATUS["snapshot"], "error": None})
    return run


def test_status_prints_times_in_iso_8601_and_ages_in_human_units(daemon):
    """built_at is a local ISO 8601 time with its offset, never an epoch float; ages,
    uptime and intervals are in s, min, h, d."""
    code, out, err = daemon("status", store=False)
    assert code == 0, err
    lines = dict(line.strip().split(": ", 1) for line in out.splitlines()
                 if ": " in line)
    assert ISO.fullmatch(lines["built_at"])
    assert datetime.fromisoformat(lines["built_at"]).timestamp() == pytest.approx(
        NOW - 192.4, abs=1)
    assert lines["uptime"] == "2 d 3 h"
    assert lines["age"] == "3 min 12 s"
    assert lines["last_check_age"] == "0.4 s"
    assert lines["last_error_age"] == "1 h 2 min"
    assert lines["failing_for"] == "1 min 5 s"
    assert lines["refresh_interval"] == "5.0 s"
    assert lines["pid"] == "4242" and lines["failed_refreshes"] == "4"
    assert str(int(NOW))[:6] not in out


def test_status_json_keeps_the_numbers(daemon):
    """--json is the daemon's answer unchanged: epoch seconds and seconds."""
    code, out, err = daemon("status", "--json", store=False)
    assert code == 0, err
    assert json.loads(out) == STATUS


def test_reload_prints_the_snapshot_like_status(daemon):
    """reload's answer carries the snapshot: the same rendering."""
    code, out, err = daemon("reload", store=False)
    assert code == 0, err
    assert re.search(r"built_at: " + ISO.pattern, out) and "age: 3 min 12 s" in out


def test_reload_that_failed_exits_5_and_says_why(daemon, monkeypatch):
    """The daemon could not load the store: it says why (and keeps serving its last
    snapshot); policyctl prints that and exits 5 (store unavailable), never 0."""
    monkeypatch.setattr(control_client, "reload", lambda path, timeout=5.0: {
        "reloaded": False, "snapshot": STATUS["snapshot"],
        "error": "StoreUnavailable: no store at /x.sqlite"})
    code, out, err = daemon("reload", store=False)
    assert code == 5
    assert "reloaded: off" in out and "no store at /x.sqlite" in out


def test_reload_still_running_after_the_timeout_exits_5(daemon, monkeypatch):
    """A reload stuck on a frozen store: the daemon took the request and did not answer
    in time.  Not "daemon unreachable" (3): exit 5, pointing at the store's health."""
    def stuck(path, timeout=5.0):
        raise control_client.AnswerTimeout(f"policyd did not answer within {timeout:g} s")
    monkeypatch.setattr(control_client, "reload", stuck)
    code, out, err = daemon("reload", store=False)
    assert code == 5
    assert "still running" in err and "policyctl status" in err


def test_query_the_daemon_cannot_decide_exits_5(daemon, monkeypatch):
    """No snapshot yet (the store failed at start-up): the daemon answers with the
    reason; policyctl exits 5 (store unavailable), not 3 (unreachable)."""
    def no_snapshot(*args, **kwargs):
        raise control_client.DaemonError("policyd: no snapshot loaded yet: the store "
                                         "failed: no store at /x.sqlite")
    monkeypatch.setattr(control_client, "query", no_snapshot)
    code, out, err = daemon("query", "discuss@lists.example.org", "a@example.com",
                            store=False)
    assert code == 5
    assert "no snapshot loaded yet" in err and "temporary failure" in err


# --- status: SMTP-time moderation -----------------------------------------------------------


def _status_through_the_socket(service) -> dict:
    """The daemon's answer to ``{"op": "status"}`` on its control socket."""
    from twisted.internet.testing import StringTransport

    protocol = service.control_factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b'{"op": "status"}\n')
    answer = json.loads(transport.value().splitlines()[0])
    assert answer["ok"], answer
    return answer["result"]


def _block(out: str, name: str) -> dict:
    """The ``key: value`` lines of the indented block under ``name:``."""
    lines = out[out.index(f"\n{name}:\n") + len(name) + 3:].splitlines()
    block = []
    for line in lines:
        if not line.startswith("  "):
            break
        key, _, value = line.strip().partition(": ")
        block.append((key, value))
    return dict(block)


def test_status_shows_smtp_time_moderation(daemon, tmp_path, monkeypatch):
    """``policyctl status`` (and ``--json``) has a ``moderation`` block: in use, whether
    the state is usable (not loaded yet, last sync failed), the last good sync's age,
    failed syncs, the index's sizes (pending: undecided tickets), the caps and the rows
    they pushed out, and a stay at a cap going on.  Through the control socket."""
    from dataclasses import replace

    from policyd.core.moderation import Decision

    from ..test_metrics import GREY, MODERATED, Moderated
    from ..test_tap import build

    (tmp_path / "daemon").mkdir()
    service, reactor, _ = build(tmp_path / "daemon")
    m = Moderated()
    service.moderation = m.service
    moderation = _status_through_the_socket(service)["moderation"]
    assert moderation["in_use"] is True and moderation["usable"] is False
    assert moderation["state"].startswith("not loaded yet")
    assert moderation["last_sync_age"] is None
    state = m.service.state
    state.settings = replace(state.settings, max_tickets=4)  # a network's share: 2
    m.service.sync()
    m.ask(GREY)
    for n in range(4):  # one network: the last two are kept out at its share
        m.ask(MODERATED, f"stranger{n}@example.net")
    state.decide(next(iter(state.tickets)), Decision.REJECT)
    m.clock.advance(7)
    result = _status_through_the_socket(service)
    assert result["moderation"] == {
        "in_use": True, "state": "usable", "usable": True, "clock_offset": 0.0,
        "last_sync_age": 7.0, "sync_interval": 5.0, "sync_failures": 0, "greylist_entries": 1,
        "remembered_senders": 0, "tickets": 2, "pending_tickets": 1,
        "max_entries": 100_000, "max_tickets": 4, "evicted": 0,
        "at_cap": {"running_for": 7.0, "kept_out": 2, "evicted": 0}}
    monkeypatch.setattr(control_client, "status", lambda path, timeout=5.0: result)
    code, out, err = daemon("status", store=False)
    assert code == 0, err
    lines = _block(out, "moderation")
    assert lines["state"] == "usable" and lines["last_sync_age"] == "7.0 s"
    assert (lines["tickets"], lines["pending_tickets"], lines["kept_out"]) == ("2", "1", "2")
    assert lines["running_for"] == "7.0 s" and lines["sync_failures"] == "0"
    code, out, err = daemon("status", "--json", store=False)
    assert json.loads(out)["moderation"] == result["moderation"]

    m.store.fail = ConnectionError("the database is down")
    m.clock.advance(5)
    m.service.sync()
    moderation = _status_through_the_socket(service)["moderation"]
    assert moderation["usable"] is False and moderation["sync_failures"] == 1
    assert moderation["state"].startswith("unusable, the last sync failed")
    assert moderation["last_sync_age"] == 12.0


def test_status_says_moderation_is_not_in_use(daemon, tmp_path, monkeypatch):
    """No list with ``smtp_moderation`` (or a store without a place for its state):
    ``moderation`` says it is not in use, and nothing more."""
    from ..protocols.fakes import StaticSnapshots, sample_snapshot
    from ..test_metrics import Moderated
    from ..test_tap import build

    (tmp_path / "daemon").mkdir()
    service, reactor, _ = build(tmp_path / "daemon")
    assert service.moderation is None
    result = _status_through_the_socket(service)
    assert result["moderation"] == {"in_use": False,
                                    "state": "not in use (no list has smtp_moderation set)"}
    m = Moderated()
    m.service.snapshots = StaticSnapshots(sample_snapshot())
    service.moderation = m.service
    assert _status_through_the_socket(service)["moderation"] == result["moderation"]
    monkeypatch.setattr(control_client, "status", lambda path, timeout=5.0: result)
    code, out, err = daemon("status", store=False)
    assert code == 0, err
    assert "\nmoderation:\n  in_use: off\n  state: not in use" in out


@pytest.mark.parametrize("seconds, text", [
    (0, "0.0 s"), (0.04, "0.0 s"), (9.94, "9.9 s"), (9.96, "10 s"), (59.4, "59 s"),
    (59.6, "1 min 0 s"), (3599, "59 min 59 s"), (3600, "1 h 0 min"),
    (86399, "23 h 59 min"), (90061, "1 d 1 h"), (-3, "0.0 s"),
])
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_iso_time_is_local_with_offset():
    text = iso_time(0)
    assert ISO.fullmatch(text)
    assert datetime.fromisoformat(text).timestamp() == 0


# --- import-mailman2 --quiet ---------------------------------------------------------------


@pytest.fixture
def importer(capsys, tmp_path) -> Ctl:
    run = Ctl(capsys, tmp_path)
    run.ok("init")
    return run


def _fixtures():
    from tests.mailman2.test_import import FIXTURES

    return FIXTURES


def test_import_quiet_says_nothing_when_nothing_changed(importer):
    """A cron job's second run with --quiet prints nothing at all: no list lines and not
    the warnings the first run printed (they are about data that did not change)."""
    mailman = _fixtures() / "mailman"
    code, out, err = importer("import-mailman2", "--quiet", str(mailman))
    assert code == 0, err
    assert "created" in out and "using config.pck.last" in err and "'^bad[regex'" in err
    assert importer("import-mailman2", "--quiet", str(mailman)) == (0, "", "")
    # Without --quiet every list is reported, its warnings too.
    code, out, err = importer("import-mailman2", str(mailman))
    assert "announce@lists.example.org: unchanged" in out and "'^bad[regex'" in err


def test_import_quiet_says_what_changed_with_its_warnings(importer, tmp_path):
    """When one list changes, --quiet prints that list's line (and its warnings), nothing
    about the others."""
    fixtures = _fixtures()
    mailman = tmp_path / "mailman"
    shutil.copytree(fixtures / "mailman", mailman)
    importer.ok("import-mailman2", str(mailman))
    shutil.copy(fixtures / "variants" / "discuss-v2.pck",
                mailman / "lists" / "discuss" / "config.pck")
    code, out, err = importer("import-mailman2", "--quiet", str(mailman))
    assert code == 0, err
    assert out.splitlines() == [line for line in out.splitlines()
                                if line.startswith("discuss@lists.example.org: ")]
    assert len(out.splitlines()) == 1
    assert "announce" not in err and "fallback" not in err


def test_import_quiet_still_reports_errors(importer):
    """Lists that cannot be imported are errors: said on every run, exit 2."""
    evil = _fixtures() / "evil"
    for _ in range(2):
        code, out, err = importer("import-mailman2", "--quiet", str(evil))
        assert code == 2
        assert "not imported: evil:" in err and "2 list(s) not imported" in err


@pytest.mark.parametrize("value", ["inf", "1e12", "0", "-1", "x"])
def test_a_timeout_beyond_reason_is_bad_input(daemon, value):
    """``--timeout inf`` was an OverflowError traceback (exit 1)."""
    code, out, err = daemon("status", "--timeout", value, store=False)
    assert code == 2 and "--timeout" in err and "Traceback" not in err
