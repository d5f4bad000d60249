"""Moderator-password verification computes libcrypt without the GIL (ctypes), with
exactly the results of the stdlib ``crypt.crypt`` passlib would call otherwise."""

from __future__ import annotations

import threading
import time

import passlib.utils
from passlib.hash import sha256_crypt, sha512_crypt

from policyd.core import passwords

PASSWORDS = ["right horse", "pässwörd ☃ 秘密", "", "x" * 600, "long " * 100]

SETTINGS = ["$6$rounds=1000$abc$", "$6$saltsalt$", "$6$rounds=5000$saltsalt$",
            "$5$rounds=5000$x$", "$5$rounds=1234$./Zz09$", "$6$rounds=1000$0123456789abcdefXYZ$",
            "xx", "$1$abc$", "$6$rounds=10$abc$", "$6$ab:c$", "$9$x", "*", "", "$6$"]


def stock_crypt():
    """The ``crypt.crypt`` passlib called before policyd put libcrypt without the GIL."""
    passwords._crypt_context()
    stock = getattr(passwords, "_stock_crypt", None)
    assert stock is not None, "passlib still calls crypt.crypt (with the GIL)"
    assert passlib.utils._crypt is passwords._crypt_without_gil is not stock
    return stock


def outcome(f, *args):
    try:
        return f(*args)
    except Exception as e:  # the same exception type as crypt.crypt's
        return type(e)


def test_the_ctypes_crypt_returns_what_crypt_crypt_returns():
    stock = stock_crypt()
    words = PASSWORDS + ["a\0b", "\udcff", b"bytes"]
    for word in words:
        for setting in SETTINGS + ["$6$a\0b$"]:
            assert (outcome(passwords._crypt_without_gil, word, setting)
                    == outcome(stock, word, setting)), (word, setting)
    # failures look the same to passlib: an invalid hash beginning with "*"
    assert stock("pw", "$9$x").startswith("*")
    assert passwords._crypt_without_gil("pw", "$9$x") == stock("pw", "$9$x")


MADE_UP = "$6$rounds=5000$saltsalt$" + "x" * 86  # a checksum nothing hashes to
NONSENSE = "$6$nonsense"  # malformed (passlib raises ValueError; policyd: a mismatch)


def expected(password, hashed, candidate):
    if hashed == NONSENSE:
        return ValueError
    if candidate == "\udcff":  # crypt.crypt cannot encode it (policyd: a mismatch)
        return UnicodeEncodeError
    return candidate == password and hashed != MADE_UP


def test_without_crypt_rn_crypt_r_gives_the_same(monkeypatch):
    """A libcrypt without crypt_rn (glibc's former one): crypt_r and a zeroed buffer."""
    import ctypes
    stock, real = stock_crypt(), ctypes.CDLL

    class WithoutCryptRn:
        def __init__(self, *args, **kwargs):
            self.lib = real(*args, **kwargs)

        def __getattr__(self, name):
            if name == "crypt_rn":
                raise AttributeError(name)
            return getattr(self.lib, name)

    monkeypatch.setattr(ctypes, "CDLL", WithoutCryptRn)
    crypt_r = passwords._load_crypt_without_gil()
    monkeypatch.undo()
    assert crypt_r is not None and crypt_r is not passwords._crypt_without_gil
    for word in ("right horse", "pässwörd", "", "x" * 600, "a\0b"):
        for setting in SETTINGS:
            assert outcome(crypt_r, word, setting) == outcome(stock, word, setting)


def hashes(password):
    yield sha512_crypt.using(rounds=1000).hash(password)
    yield sha512_crypt.using(rounds=5000).hash(password)  # implicit rounds: "$6$salt$"
    yield sha512_crypt.using(rounds=5000, salt="a").hash(password)
    yield sha512_crypt.using(rounds=1001, salt="./09AZaz").hash(password)
    yield sha256_crypt.using(rounds=1000, salt="0123456789abcdef").hash(password)
    yield sha256_crypt.using(rounds=5000).hash(password)
    yield sha256_crypt.using(rounds=2000, salt="Q").hash(password)
    yield MADE_UP
    yield NONSENSE


def test_passlib_verifies_as_with_the_stock_crypt(monkeypatch):
    stock = stock_crypt()
    """passlib's own verification (``safe_crypt``, the context's ``verify``) of hashes of
    every kind: the same results, exceptions included, through either crypt."""
    cases = [(password, hashed, candidate)
             for password in PASSWORDS for hashed in hashes(password)
             for candidate in (password, password + "x", "\udcff")]
    assert "rounds=" not in cases[3][1] and cases[3][1].startswith("$6$")

    def results():
        context = passwords._crypt_context()
        return [(outcome(passlib.utils.safe_crypt, candidate, hashed),
                 outcome(context.verify, candidate, hashed)) for _, hashed, candidate in cases]

    mine = results()
    with monkeypatch.context() as m:
        m.setattr(passlib.utils, "_crypt", stock)
        theirs = results()
    assert mine == theirs
    assert [verified for _, verified in mine] == [expected(*case) for case in cases]


def test_policyd_verifies_as_with_the_stock_crypt(monkeypatch):
    stock = stock_crypt()
    """``verify_password`` (Mailman's ``verify_and_update``) of policyctl's hashes and of
    hashes at Mailman's minimum rounds: the same results through either crypt."""
    cases = [(password, hashed, candidate)
             for password, hashed in [(p, passwords.hash_password(p)) for p in PASSWORDS[:4]]
             + [("right horse", sha256_crypt.using(rounds=80000).hash("right horse"))]
             for candidate in (password, password + "x", "\udcff")]
    cases += [("p", MADE_UP, "p"), ("p", NONSENSE, "p")]

    def results():
        passwords._RESULTS.clear()
        return [passwords.verify_password(candidate, hashed) for _, hashed, candidate in cases]

    mine = results()
    with monkeypatch.context() as m:
        m.setattr(passlib.utils, "_crypt", stock)
        theirs = results()
    passwords._RESULTS.clear()
    assert mine == theirs
    assert mine == [expected(*case) is True for case in cases]


def test_a_verification_in_a_thread_leaves_the_gil_to_the_other_threads():
    # A made-up checksum: verifying costs the rounds (a fraction of a second), no hashing.
    hashed = "$6$rounds=1000000$gilgilgil$" + "x" * 86
    candidate = f"guess {time.monotonic_ns()}"  # nothing remembered
    done = []
    worker = threading.Thread(
        target=lambda: done.append(passwords.verify_and_remember(candidate, hashed)))
    started = time.perf_counter()
    worker.start()
    ticks = 0
    while worker.is_alive():
        time.sleep(0.001)
        ticks += 1
    elapsed_ms = (time.perf_counter() - started) * 1000
    worker.join()
    assert done == [False]
    assert elapsed_ms > 50  # the rounds really cost time
    # With the GIL held for the whole crypt call the main thread gets ~1 tick; released,
    # about one per millisecond (a tenth of that leaves room for a loaded machine).
    assert ticks >= elapsed_ms / 10, (ticks, elapsed_ms)


WITHOUT_CRYPT_MODULE = r'''
import sys
sys.modules["crypt"] = None  # as on Python 3.13: "import crypt" fails
import passlib.utils
from passlib.handlers import sha2_crypt
assert passlib.utils._crypt is None and passlib.utils.safe_crypt("a", "$6$x$") is None
from policyd.core import passwords
passwords._crypt_context()
print(sha2_crypt.sha512_crypt.get_backend(), sha2_crypt.sha256_crypt.get_backend())
good = sha2_crypt.sha512_crypt.using(rounds=5000).hash("right horse")
print(passwords.verify_and_remember("right horse", good),
      passwords.verify_and_remember("wrong horse", good),
      passwords.verify_and_remember("x", "$6$nonsense"),
      passwords.verify_and_remember("a\0b", good))
print(sha2_crypt.sha512_crypt.verify("policyd", passwords._CHECK_HASH),
      sha2_crypt.sha256_crypt.verify("pw", "$5$rounds=5000$x$"
                                     "/cBhd5GcW3piDgPuh0MUtkW8cGNHV1SzlwHMIYtAf73"))
'''


def test_without_the_crypt_module_passlib_gets_the_ctypes_path_too():
    """Python 3.13 (Debian 13) has no ``crypt`` module: passlib's sha2_crypt handlers
    then compute in pure Python, holding the GIL between switch intervals.  policyd gives
    them the ctypes path as their ``os_crypt`` backend, with the same results."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", WITHOUT_CRYPT_MODULE], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    backends, verdicts, same = out.stdout.splitlines()
    assert backends == "os_crypt os_crypt"
    assert verdicts == "True False False False"
    assert same == "True True"
