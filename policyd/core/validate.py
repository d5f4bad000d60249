"""Which addresses may be stored: those a sender could ever be (pure).

A sender reaches a membership lookup as ``normalise`` makes it and, in Mailman 3 mode,
only if Mailman 3's validator keeps it (``mailman_valid``); Mailman 2 and 3 refuse to
subscribe anything else in the first place.  An address stored in any other shape
(``a b@example.com``, ``a;b@example.com``, ``bad@@line``) is a member nobody can post
as, stored silently.  So what may be stored is decided by two functions that already
decide the senders, and nothing else:

* ``normalise`` must read it (an ``@``, a local part, a domain, no control characters);
* the normalised address must pass ``mailman_valid``, Mailman 3.3's
  ``mailman/email/validate.py``: local part of ``[-0-9a-z!#$%&'*+./=?@_`{}~]``, a domain
  of two or more labels of ``[-a-z0-9]`` (IDNA A-labels), none starting with ``-``;
* but a local part may also hold non-ASCII letters (RFC 6531, SMTPUTF8 mail): in Mailman
  2 mode such a sender is read and matched like any other.  Mailman 3 keeps no such
  sender in ``msg.senders`` (its validator is ASCII only), which ``policyctl`` says when
  one is added to a mailman3 list;
* and the local part has no ``@``.  Mailman's validator lets that one through (it splits
  at the last ``@``), but ``x@y@z.example`` can only be written ``"x@y"@z.example``, and
  Mailman keeps that sender quoted in ``msg.senders``, so the unquoted member never
  matches it there.

``problem`` returns why an address cannot be stored, worded for the admin; the verdict
itself is always the functions above, the wording only explains it.
"""

from __future__ import annotations

import re

from .addresses import mailman_valid, normalise, split_address

__all__ = ["non_ascii_local", "problem"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LOCAL_BAD = re.compile(r"[^-0-9a-z!#$%&'*+./=?_`{}~]")
_LABEL_BAD = re.compile(r"[^-a-z0-9]")


def problem(text: str) -> str | None:
    """Why ``text`` (one address as typed, ``<>`` allowed around it) can never be a
    sender, or ``None`` when it can be stored; its stored form is ``normalise(text)``."""
    address = normalise(text)
    if address is not None:
        local, domain = split_address(address)
        if "@" not in local and mailman_valid(f"{_ascii_letters(local)}@{domain}"):
            return None
    return _explain(text.strip(), address)


def _ascii_letters(local: str) -> str:
    """The local part with each non-ASCII character that is not white space as ``a``: what
    Mailman's validator says about the rest of it."""
    if local.isascii():
        return local
    return "".join("a" if not ch.isascii() and not ch.isspace() else ch for ch in local)


def non_ascii_local(address: str) -> bool:
    """A (normalised) address Mailman 3 drops from ``msg.senders`` though it may be
    stored: one with a non-ASCII local part."""
    return not split_address(address)[0].isascii()


def _explain(text: str, address: str | None) -> str:
    if address is None:
        if not text or text == "<>":
            return "empty"
        if _CONTROL.search(text):
            return "control characters"
        if "@" not in text:
            return "no @domain"
        return "not an address"
    local, domain = split_address(address)
    if "@" in local:
        return "more than one '@'"
    bad = _LOCAL_BAD.search(_ascii_letters(local))
    if bad is not None:
        return _character(bad.group(), "local part")
    if domain.startswith("["):
        return "an address literal, not a domain name"
    labels = domain.split(".")
    if len(labels) < 2:
        return f"domain {domain!r} is not fully qualified"
    for label in labels:
        bad = _LABEL_BAD.search(label)
        if bad is not None:
            return _character(bad.group(), "domain")
        if label.startswith("-"):
            return f"domain label {label!r} starts with '-'"
    return "not an address Mailman accepts"


def _character(ch: str, where: str) -> str:
    if ch.isspace():
        return f"white space in the {where}"
    return f"{ch!r} is not allowed in the {where}"
