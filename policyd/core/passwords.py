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
from collections import OrderedDict

__all__ = ["MAILMAN_PASSLIB", "hash_password", "verify_password"]

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


def hash_password(password: str) -> str:
    """The hash Mailman's ``config.password_context.encrypt`` would store."""
    return _crypt_context().hash(password)


def verify_password(password, hashed: str | bytes) -> bool:
    """Mailman's ``PasswordContext.verify(password, hashed)[0]``.

    Where Mailman would raise (a candidate passlib refuses, e.g. with a NUL or longer
    than 4096 bytes; a malformed hash) and so shunt the message, this is a mismatch."""
    if isinstance(hashed, bytes):
        hashed = hashed.decode("utf-8", "replace")
    if not isinstance(password, str):
        password = str(password)
    key = (hashed, hashlib.sha256(password.encode("utf-8", "surrogatepass")).digest())
    known = _RESULTS.get(key)
    if known is not None:
        _RESULTS.move_to_end(key)
        return known
    from passlib.exc import UnknownHashError
    try:
        valid, _ = _crypt_context().verify_and_update(password, hashed)
    except UnknownHashError:
        valid = False
    except (ValueError, TypeError):
        valid = False
    _RESULTS[key] = valid = bool(valid)
    if len(_RESULTS) > _RESULTS_MAX:
        _RESULTS.popitem(last=False)
    return valid
