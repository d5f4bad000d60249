"""The log's bounds, whatever a client sends: each value of a decision line cut at
``FIELD_MAX`` characters, at most ``MAX_LISTS`` lists (each a line) per Exim request.
"""

from __future__ import annotations

import io

import pytest

from policyd.logging import FIELD_MAX, capped, log_fields, make_observer
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
