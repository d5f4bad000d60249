"""The optional message keys of the Exim request (``headers=``, ``body=``, ``size=``)."""

from __future__ import annotations

import base64

import pytest

from policyd.protocols import ProtocolError
from policyd.protocols.exim import parse_request


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def test_a_request_without_the_message_keys_still_parses():
    """An older ACL's request (no headers=, body=, size=) gives queries without a
    message, decided from from=/reply_to=/sender_header= as before."""
    request = parse_request(f"POLICYD/1 list=l@x.example sender= from={_b64(b'a@b.example')}"
                            .encode())
    (query,) = request.queries()
    assert query.message is None
    assert query.from_header == "a@b.example"


def test_headers_give_each_field_and_replace_from():
    """With headers=, From:/Reply-To:/Sender: come from the header block, each field on
    its own (a repeated From: stays two fields); from= is ignored."""
    block = b"From: a@b.example\nFrom: c@d.example,\nSubject: hi\n  there\n"
    line = (f"POLICYD/1 list=l@x.example sender= from={_b64(b'ignored@x.example')} "
            f"headers={_b64(block)} body={_b64(b'Approved: x')} size=120").encode()
    (query,) = parse_request(line).queries()
    assert query.message.get_all("from") == ["a@b.example", "c@d.example,"]
    assert query.message.get_all("subject") == ["hi\n  there"]
    assert query.message.body == "Approved: x"
    assert query.message.size == 120
    assert query.from_header == "a@b.example\nc@d.example,"


@pytest.mark.parametrize("words", ["size=12x", "size=-1", "headers=!!", "body=%%"])
def test_bad_message_keys_are_malformed(words):
    """A size that is not a number or a header block or body that is not base64 is a
    malformed request (answered with the temporary failure), never decided."""
    with pytest.raises(ProtocolError):
        parse_request(f"POLICYD/1 list=l@x.example sender= headers= {words}".encode())
