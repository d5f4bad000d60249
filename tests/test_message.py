"""The message's header block: the plain line splitter agrees with ``email``'s parser."""

from __future__ import annotations

import email
from email.policy import compat32

from hypothesis import given, settings, strategies as st

from policyd.core.message import Message, parse_message, split_headers


def _parser_pairs(block: bytes):
    parsed = email.message_from_bytes(block + b"\n", policy=compat32)
    return tuple((str(name), str(value)) for name, value in parsed._headers)


_name = st.one_of(st.sampled_from(["From", "Subject", "To", "Received", "X-Spam", "List-Post",
                                   "DKIM-Signature", "from", "SUBJECT", "Approved"]),
                  st.text(st.sampled_from(list("aZ-_!~.;[]") + [" ", "é", "\x7f", ":"]),
                          max_size=6))
_value = st.text(st.sampled_from(list("ab <>@.,;:=?\"()\t ") + ["ü", "\x00", "\x0c", "\r",
                                                                  "\x85", "\u2028"]),
                 max_size=15)
_line = st.one_of(
    st.tuples(_name, st.sampled_from([":", ": ", ":\t", " :", ""]), _value).map("".join),
    st.tuples(st.sampled_from([" ", "\t", "  "]), _value).map("".join),  # continuation
    st.sampled_from(["", "From someone", "no colon here", ":empty name"]),
)


@settings(max_examples=3000, deadline=None)
@given(st.lists(_line, max_size=8), st.sampled_from(["\n", "\r\n"]), st.booleans())
def test_splitter_gives_the_parsers_fields(lines, end, latin):
    """Wherever the splitter answers, it answers what the parser makes of the block;
    ``parse_message`` gives the parser's fields for every block."""
    text = end.join(lines) + end
    raw = text.encode("latin-1" if latin else "utf-8", "replace")
    block = raw.replace(b"\r\n", b"\n")
    expected = _parser_pairs(block)
    split = split_headers(block.decode("ascii", "surrogateescape"))
    if split is not None:
        assert split == expected
    assert parse_message(raw).headers == expected


def test_splitter_takes_a_real_post_whole():
    block = (b"Received: from mx.example.org (mx.example.org [192.0.2.1])\n"
             b"\tby lists.example.com with esmtp\n"
             b"DKIM-Signature: v=1; a=rsa-sha256;\n b=abc\n"
             b"From: =?utf-8?q?P=C3=A4t?= <pat@example.com>\n"
             b"Subject:\n"
             b"X-Empty:   \n"
             b"To: list@lists.example.com\n")
    pairs = split_headers(block.decode("ascii", "surrogateescape"))
    assert pairs is not None and pairs == _parser_pairs(block)
    assert dict(pairs)["Subject"] == "" and dict(pairs)["X-Empty"] == ""


def test_lookups_by_name_any_case():
    message = parse_message(b"Subject: one\nsubject: two\nTo: x@example.com\n")
    assert message.get_all("SUBJECT") == ["one", "two"]
    assert message.first("subject") == "one" and message.first("cc") is None
    assert message.has("to") and not message.has("cc")
    # built by hand, without the lower-cased names
    plain = Message((("Subject", "one"),))
    assert plain.get_all("subject") == ["one"] and plain.first("SUBJECT") == "one"
