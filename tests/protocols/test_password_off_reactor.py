"""A moderator password is never verified on the reactor: a request whose decision needs
one waits while a thread verifies it, then is decided again; a flood of made-up passwords
gets the temporary failure at once instead of a queue."""

from __future__ import annotations

import base64

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from policyd.config import EximConfig
from policyd.core.passwords import hash_password
from policyd.core.replies import ReplyPolicy
from policyd.core.snapshot import ListSpec, MemberSpec, build
from policyd.core.verdict import Action
from policyd.decider import Decider, FixedSnapshot
from policyd.protocols.exim import EximFactory

LIST = "announce@lists.example.com"
CONFIG = EximConfig(listen=(), timeout=10.0, max_request=65536)


class Threads:
    """``run_in_thread`` whose jobs the test runs when it wants (no real thread)."""

    def __init__(self) -> None:
        self.jobs: list = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.jobs.append((d, f, args))
        return d

    def run_all(self) -> None:
        while self.jobs:
            d, f, args = self.jobs.pop(0)
            d.callback(f(*args))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def request(password: str) -> bytes:
    headers = (f"From: stranger@outside.example\nTo: {LIST}\nSubject: news\n"
               f"Approved: {password}\n").encode()
    return (f"POLICYD/1 list={LIST} sender={b64(b'stranger@outside.example')} "
            f"headers={b64(headers)} body={b64(b'hello')} size=100").encode()


def factory(threads: Threads) -> EximFactory:
    snapshot = build([ListSpec(LIST, members=(MemberSpec("pat@example.com"),),
                               default_nonmember_action=Action.REJECT,
                               # a fresh salt: nothing remembered from another test
                               moderator_password=hash_password("right horse"))],
                     version="v1", built_at=0.0)
    decider = Decider(FixedSnapshot(snapshot), ReplyPolicy(), run_in_thread=threads)
    return EximFactory(decider, CONFIG, Clock())


def test_the_right_password_is_verified_in_a_thread_then_accepted():
    threads = Threads()
    f = factory(threads)
    answer = f.answer(request("right horse"), None)
    assert isinstance(answer, defer.Deferred) and len(threads.jobs) == 1
    results = []
    answer.addCallback(results.append)
    assert results == []  # nothing verified on the reactor
    threads.run_all()
    assert results[0].startswith(b"ACCEPT 250")
    # remembered: the same password again is decided at once
    assert f.answer(request("right horse"), None).startswith(b"ACCEPT 250")


def test_a_wrong_password_is_rejected_after_its_check():
    threads = Threads()
    answer = factory(threads).answer(request("wrong"), None)
    results = []
    answer.addCallback(results.append)
    threads.run_all()
    assert results[0].startswith(b"REJECT 550 5.7.1")


def test_the_protocol_waits_and_a_half_close_does_not_answer_twice():
    threads = Threads()
    f = factory(threads)
    protocol = f.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(request("right horse") + b"\n")
    protocol.readConnectionLost()  # Exim's half-close while the check runs
    assert transport.value() == b"" and not transport.disconnecting
    threads.run_all()
    assert transport.value().startswith(b"ACCEPT 250") and transport.disconnecting


def test_a_flood_of_made_up_passwords_gets_the_temporary_failure_at_once():
    threads = Threads()
    f = factory(threads)
    waiting = [f.answer(request(f"guess {n}"), None) for n in range(Decider.MAX_WAITING)]
    assert all(isinstance(d, defer.Deferred) for d in waiting)
    over = f.answer(request("one more guess"), None)
    assert over.startswith(b"DEFER 451 4.3.0")
    threads.run_all()
