"""Address parsing and normalisation (mission.md section 5)."""

import pytest
from hypothesis import given, settings, strategies as st

from policyd.core.addresses import mailman_valid, normalise, parse_header


@pytest.mark.parametrize("raw, expected", [
    ("Alice <Alice@Example.COM>", ("alice@example.com",)),
    ("alice@example.com", ("alice@example.com",)),
    # An encoded comma stays in the display name: the address is still found.
    ("=?utf-8?Q?Last=2C_First?= <u@example.com>", ("u@example.com",)),
    ("=?utf-8?B?TGFzdCwgRmlyc3Q=?= <u@example.com>", ("u@example.com",)),
    # An encoded "<spoof@member>" never becomes an address.
    ("=?utf-8?Q?=3Cspoof=40member.example=3E?= <real@example.com>", ("real@example.com",)),
    ("a@x.example, B <b@y.example>", ("a@x.example", "b@y.example")),
    ("Team: a@x.example, \"B, b\" <b@y.example>;", ("a@x.example", "b@y.example")),
    ("undisclosed-recipients:;", ()),
    ("\"quoted part\"@x.example", ("quoted part@x.example",)),
    ("\"Quoted Name\" <\"q p\"@X.example>", ("q p@x.example",)),
    ("a@x.example (A comment, with a comma)", ("a@x.example",)),
    ("(lead comment) a@x.example", ("a@x.example",)),
    ("<@relay.example,@other.example:u@final.example>", ("u@final.example",)),
    ("u@bücher.example", ("u@xn--bcher-kva.example",)),
    ("U@BÜCHER.example", ("u@xn--bcher-kva.example",)),
    ("Name <a@x.example>\nOther <b@y.example>", ("a@x.example", "b@y.example")),
    ("Folded\r\n <a@x.example>", ("a@x.example",)),
    ("John Doe", ()),
    ("", ()),
    ("<>", ()),
    ("x <>", ()),
    ("@", ()),
    ("user@", ()),
    ("@domain.example", ()),
    ("not an address at all", ()),
    # Mailman 2.1's Python reads an unterminated quote as the address.
    ("\"unterminated@x.example", ("unterminated@x.example",)),
    # ... an address as the display name, and one after the angle, as addresses too.
    ("pat@example.com <stranger@outside.example>", ("pat@example.com",
                                                    "stranger@outside.example")),
    ("<stranger@outside.example>pat@example.com", ("stranger@outside.example",
                                                   "pat@example.com")),
])
def test_parse_header(raw, expected):
    """Headers split before decoding, as Mailman 2.1's ``getaddresses`` splits them;
    every address normalised; junk dropped."""
    assert parse_header(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("Bob@Example.Com", "bob@example.com"),
    ("<bob@example.com>", "bob@example.com"),
    ("quoted part@x.example", "quoted part@x.example"),
    ("\"quoted part\"@x.example", "quoted part@x.example"),
    ("bob@example.com.", "bob@example.com"),
    ("", None),
    ("<>", None),
    ("bob", None),
    ("bob@", None),
    ("bob@exa\x00mple.com", None),
    ("bob@[192.0.2.1]", "bob@[192.0.2.1]"),
])
def test_normalise(raw, expected):
    """Envelope addresses: case folded, unquoted, IDNA, null and junk are nobody."""
    assert normalise(raw) == expected


@pytest.mark.parametrize("address, valid", [
    ("bob@example.com", True),
    ("b.o+b@sub.example.com", True),
    ("quoted part@example.com", False),
    ("bob@localhost", False),
    ("bob@-bad.example", False),
    ("bob@xn--bcher-kva.example", True),
])
def test_mailman_valid(address, valid):
    """Mirrors Mailman 3's email/validate.py on normalised addresses."""
    assert mailman_valid(address) is valid


header_text = st.text(
    alphabet=st.sampled_from(list("abcXYZ@.,;:<>\"()\\ =?-_+\t\r\n") + ["ü", "é", "\x00"]),
    max_size=80,
)


@settings(max_examples=500, deadline=None)
@given(header_text)
def test_parse_header_never_crashes_and_never_yields_empty(raw):
    """Any input parses; every address has a local part and a domain."""
    for address in parse_header(raw):
        local, _, domain = address.rpartition("@")
        assert local and domain
        assert address == address.lower() or not address.isascii()
        assert "\x00" not in address and "\n" not in address


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_normalise_total(raw):
    """normalise never raises; its output is a fixed point."""
    result = normalise(raw)
    if result is not None:
        assert "@" in result
        assert normalise(result) == result


@settings(max_examples=200, deadline=None)
@given(st.from_regex(r"[a-z][a-z0-9.]{0,10}@[a-z]{1,8}\.example", fullmatch=True),
       st.text(alphabet="abc XYZ,=?", max_size=20))
def test_display_name_never_changes_the_address(address, name):
    """Whatever the (quoted) display name, the address in the angle brackets is found."""
    quoted = '"' + name.replace('"', "") + '"'
    assert parse_header(f"{quoted} <{address}>") == (address,)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abcXY.@-+_\"é ", max_size=30))
def test_canonical_agrees_with_normalise(raw):
    """The bulk-load fast path gives exactly what normalise gives."""
    from policyd.core.addresses import canonical
    assert canonical(raw) == normalise(raw)


def _mailman3_address_slowly(spec):
    """What ``_mailman3_address`` must give, from the full parsers only."""
    from policyd.core import addresses as a

    if a.mailman3_raw_valid(spec):
        address = a._normalise_slowly(spec)
        if address is not None and a.mailman_valid(address):
            return address
    return None


def _read(specs) -> list[str]:
    """What Mailman 2's reading keeps of raw addr-specs (``parse_header``'s last step)."""
    from policyd.core.addresses import normalise_mailman2

    return [a for a in map(normalise_mailman2, specs) if a is not None]


mailbox_text = st.text(alphabet=st.sampled_from(
    list("abAB@.-_+=?!<>\"(),;: \t\r\n\\") + ["ü", "K", "\u212a"]), max_size=40)


@settings(max_examples=1000, deadline=None)
@given(mailbox_text)
def test_fast_paths_agree_with_the_full_parsers(raw):
    """Each fast path (plain address, simple "Name <addr>" header, Mailman 3's plain
    sender) gives exactly what the full code gives."""
    from policyd.core import addresses as a

    assert _read(a._addr_specs(raw)) == _read(a._addr_specs_slowly(raw))
    assert a._normalise(raw) == a._normalise_slowly(raw)
    assert a._mailman3_address(raw) == _mailman3_address_slowly(raw)


@pytest.mark.parametrize("raw", ["Alice <Alice@Example.COM>", "<bob@x.example>",
                                 "=?utf-8?Q?Smith=2C_Al?= <al@x.example> ",
                                 "Bob.Smith+tag@Example.com", "K\u212aelvin@x.example"])
def test_fast_paths_agree_on_common_shapes(raw):
    from policyd.core import addresses as a

    assert _read(a._addr_specs(raw)) == _read(a._addr_specs_slowly(raw))
    assert a._normalise(raw) == a._normalise_slowly(raw)


_spec_text = st.text(alphabet=st.sampled_from(list("abAB.@-_+=?!\"[]é") + ["\u212a"]),
                     max_size=12)
_free_text = st.text(alphabet=st.sampled_from(list("ab ,;:<>()@.=?\"\\\t\r\n")), max_size=10)
_space = st.sampled_from(["", " ", "  ", "\t", " \t"])


@settings(max_examples=2000, deadline=None)
@given(st.one_of(
    # '"Quoted, Name" <addr>' and near misses
    st.tuples(_space, st.just('"'), _free_text, st.just('"'), _space, st.just("<"),
              _spec_text, st.just(">"), _space),
    # 'addr (Comment)' and near misses
    st.tuples(_space, _spec_text, _space, st.just("("), _free_text, st.just(")"), _space),
    # 'addr'
    st.tuples(_space, _spec_text, _space),
    # '=?utf-8?B?...?=\n <addr>' and near misses
    st.tuples(_space, _spec_text, _space, st.sampled_from(["\n", "\r\n", "\n\n"]),
              _space, st.just("<"), _spec_text, st.just(">"), _space),
).map("".join))
def test_fast_paths_agree_on_header_shapes(raw):
    """Each header-shape fast path (quoted name, comment, bare address, folded
    encoded-word name) reads what the full tokenizer reads, near misses included."""
    from policyd.core import addresses as a

    assert _read(a._addr_specs(raw)) == _read(a._addr_specs_slowly(raw))


@pytest.mark.parametrize("raw", ['"Petrov, Ines" <ines.petrov97308@d1308.example.com>',
                                 "maria.schmidt462452@d452.example.com",
                                 "w.w@w.example (Walter White)",
                                 "=?utf-8?B?RXZhIFRhbmFrYSDinIk=?=\n <eva@d1584.example.com>"])
def test_common_header_shapes_take_a_fast_path(raw, monkeypatch):
    from policyd.core import addresses as a

    expected = _read(a._addr_specs_slowly(raw))
    monkeypatch.setattr(a, "_addr_specs_slowly", None)  # a slow call would fail here
    assert _read(a._addr_specs(raw)) == expected


@settings(max_examples=1000, deadline=None)
@given(st.from_regex(r"[ A-Za-z=?\"]{0,6}<?[-A-Za-z0-9.+_'^|`~!\"]{0,6}@[-A-Za-z0-9.]{0,12}>?[ ]?",
                     fullmatch=True))
def test_fast_paths_agree_on_address_like_text(raw):
    """The same agreement, on text shaped like addresses and "Name <addr>" headers."""
    from policyd.core import addresses as a

    assert _read(a._addr_specs(raw)) == _read(a._addr_specs_slowly(raw))
    for spec in a._addr_specs_slowly(raw) + [raw]:
        assert a._normalise(spec) == a._normalise_slowly(spec)
        assert a._mailman3_address(spec) == _mailman3_address_slowly(spec)


# --- Mailman 3's reading of a header (decode, then a strict parse) ------------------


@pytest.mark.parametrize("raw, expected", [
    ("Pat <Pat@Example.com>", ("pat@example.com",)),
    ("<pat@example.com>garbage", ()),
    ("pat@example.com <stranger@outside.example>", ()),
    ("<stranger@outside.example> <pat@example.com>", ()),
    ('"pat@example.com', ("pat@example.com",)),
    ("a@example.com (Smith, John)", ()),
    ('"Smith, John" <a@example.com>', ("a@example.com",)),
    ("Team: a@example.com, b@example.com;", ("a@example.com", "b@example.com")),
    ("undisclosed-recipients:;", ()),
    ("pat@example.com\n\tstranger@outside.example", ()),
    ("Pat\n <pat@example.com>", ("pat@example.com",)),
    ("a@example.com\nb@example.com", ("a@example.com", "b@example.com")),
    # a comma and a fold: one field of two mailboxes
    ("x <stranger@example.org>,\n pat@example.com", ("stranger@example.org",
                                                     "pat@example.com")),
    ("=?utf-8?q?pat=40example.com?=", ("pat@example.com",)),
    ("=?utf-8?q?=3Cpat=40example.com=3E?= <stranger@outside.example>", ()),
    ("=?utf-8?q?Doe=2C_Pat?= <pat@example.com>", ("pat@example.com",)),
    ("=?utf-8?q?Doe=2C_Pat?= pat@example.com", ()),
    ("pat@[192.0.2.1]", ()),
    ("(unbalanced pat@example.com", ()),
])
def test_parse_header_mailman3_reads_as_a_current_mailman(raw, expected):
    """Fields are RFC 2047-decoded before a strict parse that drops a field whose mailbox
    count does not match its commas, as ``msg.senders`` does on today's Pythons."""
    from policyd.core.addresses import parse_header_mailman3

    assert parse_header_mailman3(raw) == expected


_mm3_header = st.lists(st.sampled_from(
    list("abAB@.-_+=?!<>\"(),;:[] \t\r\n\\") + ["ü", "\u212a", "=?utf-8?q?", "?=",
                                                "=?iso-8859-1?b?", "=3C", "=40", "=2C"]),
    max_size=30).map("".join)


def _encoded_words(texts):
    """Encoded words (Q and B) of arbitrary texts, the bytes in one charset and labelled
    with another (often the same), some cut short."""
    import base64

    def encode(args):
        text, written, label, kind, damage = args
        raw = text.encode(written, "replace")
        if kind in "qQ":
            body = "".join(chr(b) if chr(b).isalnum() else f"={b:02X}" for b in raw)
            body = body.replace("=20", "_")
        else:
            body = base64.b64encode(raw).decode()
        return f"=?{label}?{kind}?{body[:len(body) - damage]}?="

    charsets = st.sampled_from(["utf-8", "utf-8", "iso-8859-1", "us-ascii"])
    return st.tuples(texts, charsets,
                     st.one_of(charsets, st.sampled_from(["UTF-8", "utf-16", "x-unknown"])),
                     st.sampled_from(["q", "Q", "b", "B"]),
                     st.sampled_from([0, 0, 0, 1])).map(encode)


_name_text = st.text(st.sampled_from(list("Pat Müller,<>@\"().:;[]\t\r\n=?é✉")), max_size=12)


@settings(max_examples=3000, deadline=None)
@given(st.tuples(_space, st.lists(st.one_of(_encoded_words(_name_text),
                                            st.sampled_from(["Pat", "J.", "x=?y", "Pät"])),
                                  min_size=1, max_size=3).map(" ".join),
                 st.sampled_from([" ", "", "\n ", "\r\n\t", " \n "]), st.just("<"),
                 st.one_of(st.just("pat@example.com"), _spec_text), st.just(">"),
                 _space).map("".join))
def test_mailman3_encoded_name_fast_path_agrees_with_the_strict_parse(raw):
    """An encoded display name before an angle address: the fast path gives exactly what
    decoding the whole field and the strict parse give."""
    from policyd.core import addresses as a

    assert list(a.parse_header_mailman3(raw)) == a.parse_header_mailman3_slowly(raw)


@settings(max_examples=2000, deadline=None)
@given(st.one_of(
    _mm3_header,
    st.tuples(_space, st.sampled_from(["", "Pat ", "J. R. ", "Pät ", "a@b ", "x=y "]),
              st.just("<"), _spec_text, st.just(">"), _space, _free_text).map("".join),
    st.tuples(_space, st.just('"'), _free_text, st.just('"'), _space, st.just("<"),
              _spec_text, st.just(">"), _space).map("".join),
    st.tuples(_space, _spec_text, _space, st.just("("), _free_text, st.just(")"),
              _space).map("".join),
))
def test_mailman3_fast_paths_agree_with_the_strict_parse(raw):
    """The one-mailbox fast paths give exactly what decoding and the strict parse give."""
    from policyd.core import addresses as a

    assert list(a.parse_header_mailman3(raw)) == a.parse_header_mailman3_slowly(raw)


@settings(max_examples=2000, deadline=None)
@given(_mm3_header)
def test_strict_getaddresses_is_the_standard_librarys(raw):
    """Where the running Python parses strictly, its ``getaddresses`` and policyd's copy
    agree on every (CR/LF-free) field, as Mailman hands them over."""
    import email.utils

    from policyd.core.mailman_headers import strict_getaddresses

    if not getattr(email.utils, "supports_strict_parsing", False):
        pytest.skip("this Python's email.utils has no strict parser to compare with")
    field = raw.replace("\r", "").replace("\n", "")
    assert strict_getaddresses(field) == email.utils.getaddresses([field])


@settings(max_examples=500, deadline=None)
@given(_mm3_header)
def test_decoding_skips_only_fields_without_encoded_words(raw):
    """Skipping ``make_header(decode_header(...))`` for an ASCII field with no ``=?``
    changes nothing; a field with bytes that are not ASCII is read as Mailman reads it:
    the value ``compat32`` fetches from a message parsed from bytes (a ``Header`` of
    charset unknown-8bit), decoded, its encoded words left as they are."""
    from email.header import decode_header, make_header
    from email.policy import compat32

    from policyd.core.mailman_headers import decode_like_mailman

    if "=?" in raw and raw.isascii():
        return
    # What the parser keeps of the bytes, then what compat32's get_all() returns.
    value = compat32.header_fetch_parse(
        "From", raw.encode("utf-8", "surrogateescape").decode("ascii", "surrogateescape"))
    assert decode_like_mailman(raw) == str(make_header(decode_header(value))).replace(
        "\r", "").replace("\n", "")


# --- caches bounded in bytes, not only in entries -------------------------------------------

from policyd.core import addresses as _addresses  # noqa: E402
from policyd.core.addresses import (CACHED_MAX, first_address_mailman2,  # noqa: E402
                                    parse_header_mailman3)

LONG = 8000
DISTINCT = 40


def _retained(make, count: int = DISTINCT) -> int:
    """Bytes still allocated after ``make(i)`` for ``count`` distinct values."""
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(count):
            make(i)
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


HEADER = '"{}" <A@x.example>, b@y.example'


@pytest.mark.parametrize("parse, value, expected", [
    (normalise, '"{}"@Example.COM', lambda name: f"{name}@example.com"),
    (parse_header, HEADER, lambda name: ("a@x.example", "b@y.example")),
    (first_address_mailman2, HEADER + ", c@z.example", lambda name: "a@x.example"),
    (parse_header_mailman3, HEADER, lambda name: ("a@x.example", "b@y.example")),
])
def test_values_longer_than_cached_max_are_decided_but_not_kept(parse, value, expected):
    """A client's sender or header can be tens of kilobytes: 16 384 cache entries of
    such keys held a daemon's memory at a gigabyte.  A value longer than ``CACHED_MAX``
    is parsed each time, to the same result."""
    names = [f"{'x' * LONG}{i}" for i in range(DISTINCT)]
    assert len(value.format(names[0])) > CACHED_MAX
    for name in names[:3]:
        assert parse(value.format(name)) == expected(name)
    assert _retained(lambda i: parse(value.format(names[i]))) < 100_000


def test_values_up_to_cached_max_are_still_cached():
    value = '"' + "x" * (CACHED_MAX - len('""@example.com')) + '"@example.com'
    assert len(value) == CACHED_MAX
    _addresses._normalise_cached.cache_clear()
    normalise(value)
    normalise(value)
    assert _addresses._normalise_cached.cache_info().hits == 1


def test_snapshot_resolves_long_recipients_without_keeping_them():
    """``Snapshot.resolve`` remembers recipients; a recipient longer than ``CACHED_MAX``
    (a ``+tag`` of kilobytes still names the list) is resolved each time."""
    from tests.protocols.fakes import LIST, sample_snapshot

    snapshot = sample_snapshot()
    local, _, domain = LIST.partition("@")
    target = snapshot.resolve(f"{local}+{'t' * LONG}@{domain}")
    assert target.list is not None and target.list is snapshot.resolve(LIST).list
    assert _retained(lambda i: snapshot.resolve(f"{local}+{'t' * LONG}{i}@{domain}")) \
        < 100_000
