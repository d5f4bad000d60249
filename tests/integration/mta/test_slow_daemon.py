"""The real policyd, stopped with SIGSTOP: it accepts connections (the kernel queues them)
but answers nothing.  Both MTAs must give up after their timeout with a 4xx."""

from __future__ import annotations

import time

import pytest

from .conftest import ANNOUNCE, MEMBER, POSTFIX_TIMEOUT
from .harness import Message

pytestmark = [pytest.mark.integration, pytest.mark.mta]


@pytest.fixture
def paused(policyd):
    policyd.pause()
    try:
        yield policyd
    finally:
        policyd.resume()


def post() -> Message:
    return Message(MEMBER, [ANNOUNCE], [f"From: <{MEMBER}>"])


def test_exim_gives_up_after_POLICYD_TIMEOUT(exim, paused):
    started = time.monotonic()
    result, _ = exim.bh(post(), "POLICYD_TIMEOUT=1s")
    waited = time.monotonic() - started
    assert result.rcpt == [(451, "4.3.0 List policy service unavailable, please try "
                                 "again later")], result
    assert result.data is None
    assert waited >= 1.0


def test_postfix_gives_up_after_its_timeout(postfix, paused):
    started = time.monotonic()
    result = postfix.send(post())
    waited = time.monotonic() - started
    assert result.rcpt == [(451, f"4.3.5 <{ANNOUNCE}>: Recipient address rejected: List "
                                 "policy service unavailable, please try again later")], result
    # Postfix tries twice (smtpd_policy_service_try_limit = 2), timeout each time.
    assert waited >= 2 * float(POSTFIX_TIMEOUT.rstrip("s"))


def test_answers_again_once_resumed(exim, postfix, policyd):
    """After SIGCONT (the fixture above) both MTAs get answers again."""
    result, _ = exim.bh(post())
    assert result.accepted, result
    assert postfix.send(post()).accepted
