"""Which addresses may be stored (``policyd.core.validate``): those a sender can be."""

from __future__ import annotations

import json
import random
import subprocess

import pytest
from hypothesis import given, settings, strategies as st

from policyd.core.addresses import envelope_mailman3, normalise, split_address
from policyd.core.validate import problem

from .requirements import require


@pytest.mark.parametrize("text, reason", [
    ("x@y@z.example", "more than one '@'"),
    ("bad@@line", "more than one '@'"),
    ('"x@y"@z.example', "more than one '@'"),
    ("a b@example.com", "white space in the local part"),
    ("a;b@example.com", "';' is not allowed in the local part"),
    ("a(b)@example.com", "'(' is not allowed in the local part"),
    ("j\u00f6 rg@example.com", "white space in the local part"),
    ("a\u3000b@example.com", "white space in the local part"),
    ("bob@localhost", "domain 'localhost' is not fully qualified"),
    ("bob@[192.0.2.1]", "an address literal, not a domain name"),
    ("bob@-x.example", "domain label '-x' starts with '-'"),
    ("bob@x_y.example", "'_' is not allowed in the domain"),
    ("", "empty"),
    ("<>", "empty"),
    ("bob", "no @domain"),
    ("bob@exa\x00mple.com", "control characters"),
    ("bob@x..example", "not an address"),
])
def test_problem_says_why(text, reason):
    assert problem(text) == reason


@pytest.mark.parametrize("text", [
    "bob@example.com", "Bob@Example.COM", "<bob@example.com>", "bob@example.com.",
    '"bob"@example.com', "o'brien+tag@example.com", "-x@1.example",
    "u@b\u00fccher.example", "a{b}~c@sub.example.org", "J\u00f6rg@B\u00fccher.example",
])
def test_what_mailman_takes_has_no_problem(text):
    assert problem(text) is None


_address_text = st.lists(st.sampled_from(
    list("abAB09@.-_+'\"; ,<>()[]~{}") + ["\u00fc", "\u00f6", "\t", "x", "example", ".org"]),
    max_size=24).map("".join)


@settings(max_examples=3000, deadline=None)
@given(_address_text)
def test_what_is_stored_is_a_sender_mailman_keeps(text):
    """Whatever may be stored is stored normalised, and a post whose sender is exactly
    that address is read as that address, in Mailman 3 mode too: it can match."""
    if problem(text) is not None:
        return
    stored = normalise(text)
    assert stored is not None and normalise(stored) == stored  # Mailman 2 mode's reading
    assert problem(stored) is None
    if split_address(stored)[0].isascii():
        assert envelope_mailman3(stored) == (stored,)


_MAILMAN_CHECK = """
import json, sys
from mailman.email.validate import Validator
validator = Validator()
print(json.dumps([validator.is_valid(a) for a in json.load(sys.stdin)]))
"""


def test_agrees_with_mailmans_own_validator():
    """Mailman 3.3's Validator, run in Mailman's virtualenv on the normalised addresses,
    accepts exactly what ``problem`` accepts, with two differences: a local part with an
    ``@``, which Mailman lets through and policyd refuses (no sender can match it), and
    non-ASCII letters in a local part, which policyd takes (SMTPUTF8 senders of Mailman 2
    mode lists) and Mailman does not: there the rest of the address must satisfy
    Mailman."""
    from tests.mailman.harness import mailman_python

    python = mailman_python()
    require(python is not None, "Mailman 3 virtualenv (make mailman-venv)")
    rng = random.Random(15)

    def part(alphabet: str, size: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(size)))

    local = "abcXY09.-_+'!#$%&*/=?^`{|}~" + "@; ,()<>[]\\\"\u00fc\u00a0"
    label = "abcxyz019-" + "_ \u00fc"
    samples = []
    for _ in range(4000):
        name = part(local[:28] if rng.random() < 0.6 else local, 8)
        if rng.random() < 0.15:
            name = f'"{name}"'
        labels = [part(label[:10] if rng.random() < 0.8 else label, 6) or "x"
                  for _ in range(rng.randrange(1, 4))]
        samples.append(f"{name}@{'.'.join(labels)}")
    texts = [t for t in samples if normalise(t) is not None] + [
        "x@y@z.example", "a b@example.com", "a;b@example.com", "bad@@line",
        "bob@example.com", "u@b\u00fccher.example", "bob@localhost", "bob@[192.0.2.1]",
        "j\u00f6rg@example.com", "j\u00f6 rg@example.com", "j\u00f6;rg@example.com"]
    addresses = [normalise(t) for t in texts]
    # What Mailman says about the rest of an address with non-ASCII letters in its local
    # part: those letters as "a".
    ascii_forms = []
    for address in addresses:
        local, domain = split_address(address)
        local = "".join("a" if not ch.isascii() and not ch.isspace() else ch for ch in local)
        ascii_forms.append(f"{local}@{domain}")
    done = subprocess.run([str(python), "-c", _MAILMAN_CHECK], input=json.dumps(ascii_forms),
                          capture_output=True, text=True, timeout=120, check=True)
    mailman = json.loads(done.stdout)
    assert 500 < sum(mailman) < len(mailman) - 500  # both kinds well represented
    for text, address, valid in zip(texts, addresses, mailman):
        ours = problem(text) is None
        if "@" in split_address(address)[0]:
            assert not ours, text
        else:
            assert ours == valid, (text, address, valid, problem(text))
