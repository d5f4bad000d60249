"""Moderator passwords, hashed and verified the way Mailman 3.3.10 does it (pure).

Mailman (``utilities/passwords.py``) builds a passlib ``CryptContext`` from its
``[passwords] configuration`` (by default ``mailman/config/passlib.cfg``, copied below)
and verifies with ``verify_and_update``; a hash passlib cannot identify is a mismatch.
policyd does the same with the same configuration, so a hash written by Mailman (or by
``policyctl list set --moderator-password``) verifies identically.

A sha512_crypt verification costs a noticeable fraction of a second (passlib's default
rounds): results are remembered per (hash, digest of the candidate), bounded, so the same
approved announcement to several lists, or resent, is verified once.  The candidate
password itself is never kept, logged or put in a trace.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from contextvars import ContextVar

__all__ = ["MAILMAN_PASSLIB", "VerificationNeeded", "hash_password", "verify_and_remember",
           "verify_elsewhere", "verify_password"]

# mailman/config/passlib.cfg of 3.3.10.
MAILMAN_PASSLIB = """\
[passlib]
schemes = sha512_crypt, sha256_crypt
default = sha512_crypt
sha256_crypt__min_rounds = 80000
sha512_crypt__min_rounds = 60000
admin__sha256_crypt__min_rounds = 160000
admin__sha512_crypt__min_rounds = 120000
"""

_context = None
_RESULTS: OrderedDict = OrderedDict()
_RESULTS_MAX = 1024


def _crypt_context():
    global _context
    if _context is None:
        from passlib.context import CryptContext
        _context = CryptContext.from_string(MAILMAN_PASSLIB)
    return _context


# policyctl's hashes use the fewest rounds Mailman's configuration accepts
# (``sha512_crypt__min_rounds``): they verify in Mailman exactly the same, and each
# verification costs a tenth of passlib's default 656,000 rounds on the reactor.
POLICYCTL_ROUNDS = 60000


def hash_password(password: str) -> str:
    """A hash in Mailman's scheme (sha512_crypt) that Mailman's context verifies."""
    return _crypt_context().handler().using(rounds=POLICYCTL_ROUNDS).hash(password)


class VerificationNeeded(Exception):
    """Raised by ``verify_password`` inside ``verify_elsewhere()`` when the result is not
    known yet: the caller verifies in a thread (``verify_and_remember``) and decides
    again.  A verification is a fifth of a second of CPU: never on the reactor."""

    def __init__(self, password: str, hashed: str) -> None:
        super().__init__("a moderator password is being verified")
        self.password = password
        self.hashed = hashed


_elsewhere: ContextVar[bool] = ContextVar("policyd_verify_elsewhere", default=False)
_lock = threading.Lock()


class verify_elsewhere:
    """``with verify_elsewhere():`` within the block, an unknown result raises
    ``VerificationNeeded`` instead of being computed here.  (A class: entered once per
    Exim request, where a generator-based context manager costs several times more.)"""

    __slots__ = ("_token",)

    def __enter__(self) -> None:
        self._token = _elsewhere.set(True)

    def __exit__(self, *exc) -> None:
        _elsewhere.reset(self._token)


def _key(password, hashed):
    if isinstance(hashed, bytes):
        hashed = hashed.decode("utf-8", "replace")
    if not isinstance(password, str):
        password = str(password)
    return password, hashed, (hashed, hashlib.sha256(
        password.encode("utf-8", "surrogatepass")).digest())


def verify_password(password, hashed: str | bytes) -> bool:
    """Mailman's ``PasswordContext.verify(password, hashed)[0]``.

    Where Mailman would raise (a candidate passlib refuses, e.g. with a NUL or longer
    than 4096 bytes; a malformed hash) and so shunt the message, this is a mismatch."""
    password, hashed, key = _key(password, hashed)
    with _lock:
        known = _RESULTS.get(key)
        if known is not None:
            _RESULTS.move_to_end(key)
            return known
    if _elsewhere.get():
        raise VerificationNeeded(password, hashed)
    return verify_and_remember(password, hashed)


def verify_and_remember(password, hashed: str | bytes) -> bool:
    """Verify (the costly part; thread-safe) and remember the result."""
    password, hashed, key = _key(password, hashed)
    from passlib.exc import UnknownHashError
    try:
        valid, _ = _crypt_context().verify_and_update(password, hashed)
    except UnknownHashError:
        valid = False
    except (ValueError, TypeError):
        valid = False
    valid = bool(valid)
    with _lock:
        _RESULTS[key] = valid
        if len(_RESULTS) > _RESULTS_MAX:
            _RESULTS.popitem(last=False)
    return valid
