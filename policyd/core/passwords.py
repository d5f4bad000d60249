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

Verifications run in threads (``Decider.verify``), and they must really leave the
reactor thread free.  passlib's sha512_crypt/sha256_crypt use their ``os_crypt`` backend:
``passlib.utils.safe_crypt`` calls the stdlib ``crypt.crypt`` (kept by passlib as the
module global ``passlib.utils._crypt``), and CPython's ``_crypt`` module holds the GIL
for the whole ``crypt_r`` call, so a thread verifying a made-up ``Approved:`` password
stalled every other request for tens to hundreds of milliseconds.  ``_crypt_context()``
therefore installs, once, ``_crypt_without_gil`` as ``passlib.utils._crypt``: the same
libcrypt (libxcrypt's ``crypt_rn``; ``crypt_r`` with a zeroed buffer where ``crypt_rn``
is absent) called through ``ctypes``, which releases the GIL during the foreign call.  It
takes and returns what ``crypt.crypt`` does (same library, same bytes in and out), so no
verification result changes; it is installed only after it gave ``crypt.crypt``'s answer
for a known setting.  Where ctypes cannot load libcrypt, passlib keeps calling
``crypt.crypt`` (correct, but holding the GIL).

Python 3.13 (Debian 13's) has no ``crypt`` module: there passlib's ``safe_crypt`` is a
stub and its sha2_crypt handlers fall back to their pure-Python ``builtin`` backend
(several times slower, and Python code, which holds the GIL between switch intervals).
``_install_crypt_without_gil`` then gives those handlers the ctypes path as their
``os_crypt`` backend (``_safe_crypt``, passlib's own ``safe_crypt`` for CPython 3 on
it).  A candidate libcrypt refuses (512 bytes or more) is computed by passlib's
``builtin`` backend on any Python, as in Mailman.
"""

from __future__ import annotations

import hashlib
import os
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
        _install_crypt_without_gil()
        _context = CryptContext.from_string(MAILMAN_PASSLIB)
    return _context


# sizeof(struct crypt_data): 32768 in libxcrypt (crypt.h), 131232 in glibc's former
# libcrypt on x86_64; crypt_rn refuses (ERANGE) a smaller buffer, crypt_r trusts it.
_CRYPT_RN_DATA_SIZE = 32768
_CRYPT_R_DATA_SIZE = 262144
_stock_crypt = None  # what passlib called before (``crypt.crypt``), for the tests


def _load_crypt_without_gil():
    """``crypt(word, salt)`` on libcrypt through ctypes, or None if it cannot be loaded."""
    import ctypes
    import ctypes.util
    lib = None
    for name in ("libcrypt.so.1", None):  # the soname _crypt links (Debian), else search
        name = name or ctypes.util.find_library("crypt")
        if name:
            try:
                lib = ctypes.CDLL(name, use_errno=True)  # CDLL (not PyDLL): GIL released
                break
            except OSError:
                continue
    if lib is None:
        return None
    rn = getattr(lib, "crypt_rn", None)
    if rn is not None:
        rn.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int)
        rn.restype = ctypes.c_char_p
        size = _CRYPT_RN_DATA_SIZE

        def call(word, salt, data):
            result = rn(word, salt, data, size)
            # crypt_rn returns NULL where crypt_r (CPython's) returns the invalid hash it
            # wrote to data.output, which begins with "*" (crypt(3)): return that string.
            if result is None and data.value[:1] == b"*":
                return data.value
            return result
    else:
        r = getattr(lib, "crypt_r", None)
        if r is None:
            return None
        r.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p)
        r.restype = ctypes.c_char_p
        size = _CRYPT_R_DATA_SIZE

        def call(word, salt, data):
            return r(word, salt, data)

    def crypt_without_gil(word, salt):
        # As CPython's _crypt.crypt(word, salt): both str, encoded to UTF-8 (strict), no
        # NUL; the result decoded from UTF-8; NULL is an OSError from errno.
        if not isinstance(word, str) or not isinstance(salt, str):
            raise TypeError("crypt() arguments must be str")
        word, salt = word.encode("utf-8"), salt.encode("utf-8")
        if b"\0" in word or b"\0" in salt:
            raise ValueError("embedded null character")
        result = call(word, salt, ctypes.create_string_buffer(size))  # zeroed
        if result is None:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))
        return result.decode("utf-8")
    return crypt_without_gil


# SHA-crypt's own test of a known setting (deterministic: the specification's algorithm).
_CHECK = ("policyd", "$6$rounds=1000$policydcheck$")
_CHECK_HASH = ("$6$rounds=1000$policydcheck$WFfZJH2ALJvmQIPu2doQmNvmJk7tQ43XL22Exkh5s2m/"
               "n0ZUwtjWHF816gW77IY3pAETrKnICp08b1p1yp5Pk/")


def _install_crypt_without_gil() -> None:
    """Make passlib's sha2_crypt hashes computed by libcrypt without the GIL (module
    docstring).  Once; only if the ctypes path gives the known answer for a known setting.

    With the ``crypt`` module (Python 3.11, 3.12): it replaces ``crypt.crypt`` under
    passlib's own ``safe_crypt``.  Without it (Python 3.13, Debian 13's): passlib's
    ``safe_crypt`` is a stub and sha256_crypt/sha512_crypt fall back to their pure-Python
    backend; they get ``_safe_crypt`` (passlib's ``safe_crypt`` for CPython 3, on the
    ctypes path) and their ``os_crypt`` backend back."""
    global _crypt_without_gil, _stock_crypt
    import passlib.utils
    if _crypt_without_gil is not None:
        return
    stock = getattr(passlib.utils, "_crypt", None)
    if stock is not None and getattr(stock, "__module__", None) != "crypt":
        return  # replaced by someone else
    try:
        mine = _load_crypt_without_gil()
        if mine is None or mine(*_CHECK) != _CHECK_HASH:
            return  # keep what passlib has
    except (OSError, ValueError, TypeError, AttributeError):
        return
    if stock is not None:
        _stock_crypt, _crypt_without_gil = stock, mine
        passlib.utils._crypt = mine
        return
    from passlib.handlers import sha2_crypt
    _crypt_without_gil = mine
    sha2_crypt.safe_crypt = _safe_crypt
    sha2_crypt.test_crypt = _test_crypt
    for handler in (sha2_crypt.sha256_crypt, sha2_crypt.sha512_crypt):
        try:
            handler.set_backend("os_crypt")
        except Exception:  # passlib keeps the backend it had (correct, with the GIL)
            pass


def _safe_crypt(secret, hash):
    """passlib 1.7's ``safe_crypt`` for CPython 3 (``passlib.utils``), on
    ``_crypt_without_gil``: where Python has no ``crypt`` module for passlib to use."""
    if isinstance(secret, bytes):
        try:
            secret = secret.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if "\0" in secret:
        raise ValueError("null character in secret")
    if isinstance(hash, bytes):
        hash = hash.decode("ascii")
    try:
        result = _crypt_without_gil(secret, hash)
    except OSError:
        return None
    if not result or result[0] in "*:!":
        return None
    return result


def _test_crypt(secret, hash):
    return _safe_crypt(secret, hash) == hash


_crypt_without_gil = None


# policyctl's hashes use the fewest rounds Mailman's configuration accepts
# (``sha512_crypt__min_rounds``): they verify in Mailman exactly the same, and each
# verification costs a tenth of passlib's default 656,000 rounds.
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
