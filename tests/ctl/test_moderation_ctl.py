"""``policyctl list set --smtp-moderation``, ``pending``, ``approve``, ``reject``,
``discard`` against a temporary SQLite store."""

from __future__ import annotations

import json

from policyd.core.moderation import Key, ModerationState, SmtpModeration
from policyd.store import NativeBackend, Store
from policyd.store import moderation as store_moderation

from .test_ctl import LIST, initialised, run  # noqa: F401 (fixtures)


def hold_posts(url: str, *senders: str) -> list[str]:
    """Tickets for posts of ``senders`` to LIST, written as the daemon writes them."""
    times = iter(range(1_800_000_000, 1_800_001_000, 10))
    state = ModerationState(clock=lambda: float(next(times)))
    ids = [state.check(SmtpModeration.MODERATE, Key(LIST, sender, "192.0.2.0/24",
                                                    f"<{n}@x>"), subject=f"post {n}",
                       client="192.0.2.7").ticket
           for n, sender in enumerate(senders)]
    backend = NativeBackend(url)
    try:
        store_moderation.write_changes(backend.moderation_engine, state.drain())
    finally:
        backend.close()
    return ids


def test_list_set_smtp_moderation_reaches_the_snapshot(initialised):
    """The setting is stored, shown, validated, and in the list's snapshot policy."""
    ctl = initialised
    assert "smtp moderation = moderate" in ctl.ok("list", "set", LIST,
                                                  "--smtp-moderation", "moderate")
    assert "smtp moderation:" in ctl.ok("list", "show", LIST)
    assert json.loads(ctl.ok("list", "show", LIST, "--json"))["smtp_moderation"] == \
        "moderate"
    code, _, err = ctl("list", "set", LIST, "--smtp-moderation", "sometimes")
    assert code == 2
    backend = NativeBackend(ctl.url)
    try:
        snapshot = backend.load_snapshot()
    finally:
        backend.close()
    assert snapshot.lists[LIST].smtp_moderation is SmtpModeration.MODERATE


def test_pending_and_decisions(initialised):
    """pending lists the undecided posts; approve, reject --reason and discard record
    the decision (the daemon applies it at the retry); an unknown ticket exits 4."""
    ctl = initialised
    assert ctl.ok("pending") == "no posts pending\n"
    first, second, third = hold_posts(ctl.url, "a@x.example", "b@x.example", "c@x.example")
    rows = json.loads(ctl.ok("pending", LIST, "--json"))
    assert [r["ticket"] for r in rows] == [first, second, third]
    assert rows[0]["subject"] == "post 0" and rows[0]["client"] == "192.0.2.7"
    assert first in ctl.ok("pending")
    assert f"approved ticket {first}" in ctl.ok("approve", first.lower())
    assert f"rejected ticket {second}" in ctl.ok("reject", second, "--reason", "Off topic")
    assert f"discarded ticket {third}" in ctl.ok("discard", third)
    assert json.loads(ctl.ok("pending", "--json")) == []
    store = Store(ctl.url)
    try:
        with store.read() as session:
            decided = {row.id: (row.decision, row.reason) for row in session.execute(
                store_moderation.T.select())}
    finally:
        store.close()
    assert decided == {first: ("approve", ""), second: ("reject", "Off topic"),
                       third: ("discard", "")}
    assert ctl("approve", "NOSUCH")[0] == 4
    assert ctl("reject", first, "--reason", "two\nlines")[0] == 2


def test_pending_shows_no_terminal_controls_from_old_rows(initialised):
    """A row stored before the daemon replaced C1 controls and format characters (or by
    any other writer) still reaches the moderator's terminal without them: U+009B (CSI),
    U+202E (a bidi override) and U+2028 in the Subject, sender and Message-ID become
    spaces, in the text and in ``--json``."""
    ctl = initialised
    evil = "a\x9b31m\u202eb\u2028c\u200bd"
    state = ModerationState(clock=lambda: 1_800_000_000.0)
    state.check(SmtpModeration.MODERATE, Key(LIST, f"x{evil}@x.example", "", f"<{evil}>"),
                subject=evil, client="192.0.2.7")
    backend = NativeBackend(ctl.url)
    try:
        store_moderation.write_changes(backend.moderation_engine, state.drain())
    finally:
        backend.close()
    text = ctl.ok("pending")
    [row] = json.loads(ctl.ok("pending", "--json"))
    for shown in (text, row["subject"], row["sender"], row["message_id"]):
        assert not {"\x9b", "\u202e", "\u2028", "\u200b"} & set(shown)
    assert row["subject"] == "a 31m b c d"
