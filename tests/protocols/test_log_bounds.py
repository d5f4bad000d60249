"""The log's bounds, whatever a client sends: each value of a decision line cut at
``FIELD_MAX`` characters, at most ``MAX_LISTS`` lists (each a line) per Exim request, and
under ``twist`` policyd's escaping and rate limit in front of twist's own observer.

The same with a real daemon under both launchers:
``tests/integration/daemon/test_log_bounds.py``.
"""

from __future__ import annotations

import io
import json

import pytest
from twisted.logger import LogLevel, jsonFileLogObserver, textFileLogObserver
from twisted.python.failure import Failure

from policyd.logging import FIELD_MAX, capped, guard_launcher_log, log_fields, make_observer
from policyd.protocols import ProtocolError
from policyd.protocols import exim as exim_codec
from policyd.protocols.postfix import PostfixRequest

from . import test_exim, test_postfix
from .fakes import LIST, NONMEMBER

LONG_SENDER = "x" * 44000 + "@example.net"


def decision_lines(events) -> list[str]:
    out = io.StringIO()
    _, observer = make_observer("info", out)
    for event in list(events):
        observer(event)
    return [line for line in out.getvalue().splitlines() if "[policyd.decision]" in line]


def test_capped():
    assert capped("a" * FIELD_MAX) == "a" * FIELD_MAX
    assert capped("a" * (FIELD_MAX + 7)) == "a" * FIELD_MAX + "...(+7)"


def test_a_long_sender_is_cut_in_the_decision_line(events):
    """A sender of 44 000 characters was written whole in ``sender=`` of every list's
    line; now each field is cut, the rest counted, and stays one word."""
    request = f"POLICYD/1 list={LIST} sender={test_exim.b64(LONG_SENDER)}\n".encode()
    answer, _ = test_exim.ask(request)
    assert answer.startswith(b"REJECT")
    [line] = decision_lines(events)
    assert len(line) < 4 * FIELD_MAX  # sender=, senders= and the rest
    assert f" sender=<{'x' * FIELD_MAX}...(+{len(LONG_SENDER) - FIELD_MAX})> " in line


def test_long_postfix_attributes_are_cut_in_the_decision_line(events):
    """A recipient, a sender and a client name of kilobytes (Postfix passes up to its
    line length): each cut in the line."""
    proto, transport, _, _ = test_postfix.connect()
    proto.dataReceived(test_postfix.request(
        sender="s" * 3000 + "@example.net", recipient="r" * 3000 + "@lists.example.com",
        client_name="c" * 3000, queue_id="Q" * 3000, sasl_username="u u" * 1000))
    assert transport.value().startswith(b"action=")
    [line] = decision_lines(events)
    assert len(line) < 12 * FIELD_MAX
    more = f"...(+{3000 - FIELD_MAX})"
    address_more = f"...(+{3000 + len('@lists.example.com') - FIELD_MAX})"
    assert f" list={'r' * FIELD_MAX}{address_more} " in line
    assert f" sender=<{'s' * FIELD_MAX}...(+{3000 + len('@example.net') - FIELD_MAX})> " \
        in line
    assert f" id={'Q' * FIELD_MAX}{more} " in line
    assert f' client_name="{"c" * FIELD_MAX}{more}" ' in line  # quoted: not plain


@pytest.mark.parametrize("value", [b"a" * FIELD_MAX, b"a" * (FIELD_MAX + 1), b"a b" * 200])
def test_postfix_client_fields_fast_path_cuts_as_log_fields(value):
    """The fast path for plain values writes what ``log_fields`` writes, cut included."""
    attributes = {b"client_name": value, b"queue_id": value}
    expected = log_fields([("client_name", value.decode()), ("queue_id", value.decode())])
    assert PostfixRequest(attributes).client_fields() == expected
    assert len(expected) < 3 * FIELD_MAX


def test_an_exim_request_names_at_most_max_lists_lists():
    """Each list is a decision and a log line: a request may name ``MAX_LISTS`` lists,
    one more is malformed."""
    assert exim_codec.MAX_LISTS == 20
    lists = ",".join([LIST] * exim_codec.MAX_LISTS)
    sender = test_exim.b64(NONMEMBER)
    assert len(exim_codec.parse_request(
        f"POLICYD/1 list={lists} sender={sender}".encode()).lists) == exim_codec.MAX_LISTS
    with pytest.raises(ProtocolError, match="more than 20"):
        exim_codec.parse_request(f"POLICYD/1 list={lists},{LIST} sender={sender}".encode())


# --- under twist: its observer behind policyd's escaping and rate limit -------------------


def malformed(n: int) -> dict:
    return {"log_namespace": "policyd.exim", "log_level": LogLevel.warn, "log_time": 0.0,
            "log_format": "malformed Exim policy request from {peer}: {reason}",
            "peer": "unix", "reason": f"empty request {n}"}


def forged_decision() -> dict:
    return {"log_namespace": "policyd.decision", "log_level": LogLevel.info,
            "log_time": 0.0, "log_format": "exim accept sender=<{sender}> reply={reply!r}",
            "sender": "evil\r\n2026-12-07T00:00:00.000 info [policyd] FORGED\x1b[2J@x",
            "reply": "ACCEPT\r\n"}


def twist_observer(factory, out):
    """What twist's ``Runner`` does with its options' factory once the service is made."""
    options = {"fileLogObserverFactory": factory}
    limiter = guard_launcher_log(options)
    observer = options["fileLogObserverFactory"](out)
    return limiter, observer


def test_twist_text_log_is_rate_limited_and_one_line_per_event():
    """twist's text observer wrote every malformed-request warning and a CR/LF from a
    sender as a line of its own; behind policyd's guard: five warnings, then one summary,
    and every event one line, its controls escaped as policyd's own writer does."""
    out = io.StringIO()
    limiter, observer = twist_observer(textFileLogObserver, out)
    now = [0.0]
    limiter.clock = lambda: now[0]
    for n in range(100):
        observer(malformed(n))
    observer(forged_decision())
    now[0] = 61.0
    limiter.tick()
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 + 1 + 1, lines
    assert sum("malformed Exim policy request" in line for line in lines) == 5
    assert "left out 95 similar lines" in lines[-1]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert "sender=<evil\\r\\n2026-12-07T00:00:00.000 info [policyd] FORGED\\x1b[2J@x>" \
        in lines[5]
    assert "reply='ACCEPT\\r\\n'" in lines[5]  # repr's escapes, not escaped twice


def failing_event() -> dict:
    """A failure whose exception text a peer chose (a CR/LF and a forged line in it),
    raised 300 frames deep."""
    def recurse(n):
        if n:
            recurse(n - 1)
        raise ValueError("bad sender evil\r\n2026-12-07T00:00:00.000 info [policyd] FORGED")
    try:
        recurse(300)
    except ValueError:
        failure = Failure()
    return {"log_namespace": "policyd.decider", "log_level": LogLevel.critical,
            "log_time": 0.0, "log_format": "the decision failed", "log_failure": failure}


def test_twist_text_log_writes_a_bounded_escaped_traceback():
    """twist's text observer wrote a failure's traceback as Twisted makes it: every frame
    of a deep recursion, and the exception's text raw (a CR/LF in it a forged line);
    behind policyd's guard it is the bounded traceback policyd's own writer writes."""
    out = io.StringIO()
    _, observer = twist_observer(textFileLogObserver, out)
    observer(failing_event())
    text = out.getvalue()
    assert "\r" not in text and "\n2026-12-07" not in text
    assert "bad sender evil\\r\\n2026-12-07T00:00:00.000 info [policyd] FORGED" in text
    assert "more frames left out" in text or "more times]" in text
    assert len(text.splitlines()) < 80, len(text.splitlines())


def test_twist_json_log_keeps_the_fields():
    """With twist's JSON output the event's fields are written as they were (JSON
    escapes them); only the text to read is escaped."""
    out = io.StringIO()
    _, observer = twist_observer(jsonFileLogObserver, out)
    observer(forged_decision())
    [record] = [json.loads(line.strip("\x1e")) for line in out.getvalue().split("\n")
                if line]
    assert record["sender"] == forged_decision()["sender"]
    assert "\r" not in record["log_format"] and "\\r\\n2026" in record["log_format"]


def test_twist_log_is_left_alone_for_a_launcher_without_the_factory():
    assert guard_launcher_log(None) is None
    assert guard_launcher_log({}) is None
