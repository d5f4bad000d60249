"""Verdict to SMTP outcome: the one configurable mapping the protocol adapters share.

The defaults are what a Mailman admin expects: hold is accepted (Mailman holds it),
discard is discarded, reject is ``550 5.7.1`` with the list's own notice, defer is
``451 4.7.1``.  Internal trouble is always a temporary failure, never a 5xx.
"""

from __future__ import annotations

import enum
import re
import string
from dataclasses import dataclass, field

from .addresses import CACHED_MAX
from .verdict import Decision, Verdict


class Outcome(enum.Enum):
    """What the MTA is asked to do.  Protocol adapters spell these for their MTA."""

    ACCEPT = "ACCEPT"
    HOLD = "HOLD"
    DISCARD = "DISCARD"
    REJECT = "REJECT"
    DEFER = "DEFER"


@dataclass(frozen=True, slots=True)
class SmtpReply:
    outcome: Outcome
    code: int
    status: str
    text: str

    def line(self) -> str:
        """``550 5.7.1 text``: the reply the SMTP client sees."""
        return f"{self.code} {self.status} {self.text}"


_UNSAFE = re.compile(r"[\x00-\x1f\x7f]+")
MAX_TEXT = 400


def clean_text(text: str) -> str:
    """One printable line, short enough for any MTA's reply buffer."""
    text = _UNSAFE.sub(" ", text).strip()
    if len(text) > MAX_TEXT:
        text = text[: MAX_TEXT - 3].rstrip() + "..."
    return text or "-"


# The SMTP codes each kind of reply may use (checked here and by the configuration).
PERMANENT_CODES = (500, 559)
TEMPORARY_CODES = (400, 459)

HOLD_OUTCOMES = (Outcome.ACCEPT, Outcome.HOLD)
DISCARD_OUTCOMES = (Outcome.DISCARD, Outcome.REJECT)


def _field_names(*texts: str) -> set[str]:
    """The names ``str.format`` reads in ``texts`` (``{sender.x}`` is ``sender``);
    ``{"sender"}`` for a text it cannot read (assume the worst)."""
    names = set()
    for text in texts:
        try:
            for _, name, _, _ in string.Formatter().parse(text):
                if name is not None:
                    names.add(re.split(r"[.\[]", name, maxsplit=1)[0])
        except ValueError:
            names.add("sender")
    return names


@dataclass(frozen=True)
class ReplyPolicy:
    """The verdict-to-SMTP mapping, one per daemon (``[smtp]`` in the configuration)."""

    hold: Outcome = Outcome.ACCEPT
    discard: Outcome = Outcome.DISCARD
    reject_code: int = 550
    reject_status: str = "5.7.1"
    reject_text: str = "Posting to {list} is restricted to its members; your message was not accepted"
    unknown_list_text: str = "No such list: {recipient}"
    null_sender_text: str = "The null sender may not write to {recipient}"
    discard_reject_text: str = "Your message to {list} was not accepted"
    defer_code: int = 451
    defer_status: str = "4.7.1"
    defer_text: str = "Please try again later"
    error_code: int = 451
    error_status: str = "4.3.0"
    error_text: str = "List policy service temporarily unavailable, please try again later"
    # The replies that depend only on the verdict and the rule (accept, hold, discard:
    # most answers), made once each: (verdict name, rule, managed) -> reply.
    _fixed: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    # The others (reject, defer) name the list, and the sender where a text asks for it:
    # made once per (verdict, rule, list, the list's notice, sender or None), at most
    # BY_LIST_MAX of them (then forgotten all at once), none for a list or sender longer
    # than ``CACHED_MAX``.
    _by_list: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _texts_name_the_sender: bool = field(default=True, init=False, repr=False,
                                         compare=False)
    BY_LIST_MAX = 4096

    def __post_init__(self) -> None:
        object.__setattr__(self, "_texts_name_the_sender", "sender" in _field_names(
            self.reject_text, self.unknown_list_text, self.null_sender_text,
            self.discard_reject_text, self.defer_text))
        if self.hold not in HOLD_OUTCOMES:
            raise ValueError("hold must map to accept or hold")
        if self.discard not in DISCARD_OUTCOMES:
            raise ValueError("discard must map to discard or reject")
        low, high = PERMANENT_CODES
        if not (low <= self.reject_code <= high) or not self.reject_status.startswith("5."):
            raise ValueError("reject must use a 5xx code and a 5.x.x status")
        for code, status in ((self.defer_code, self.defer_status),
                             (self.error_code, self.error_status)):
            if not (TEMPORARY_CODES[0] <= code <= TEMPORARY_CODES[1]) \
                    or not status.startswith("4."):
                raise ValueError("defer and error must use a 4xx code and a 4.x.x status")

    def reply(self, decision: Decision) -> SmtpReply:
        verdict = decision.verdict
        if verdict is Verdict.ACCEPT or verdict is Verdict.HOLD or (
                verdict is Verdict.DISCARD and self.discard is Outcome.DISCARD):
            key = (verdict._name_, decision.rule, decision.list is not None)
            reply = self._fixed.get(key)
            if reply is None:
                reply = self._fixed[key] = self._reply(decision)
            return reply
        key = (verdict._name_, decision.rule, decision.list, decision.rejection_notice,
               decision.sender if self._texts_name_the_sender else None)
        reply = self._by_list.get(key)
        if reply is None:
            reply = self._reply(decision)
            # An entry costs its key: the list is the recipient as sent for an unknown
            # list, and the sender is as sent too; a long one is made each time.
            sender = key[4]
            if len(decision.list or "") <= CACHED_MAX and (
                    sender is None or len(sender) <= CACHED_MAX):
                if len(self._by_list) >= self.BY_LIST_MAX:
                    self._by_list.clear()
                self._by_list[key] = reply
        return reply

    def _reply(self, decision: Decision) -> SmtpReply:
        fields = {"list": decision.list or "", "recipient": decision.list or "",
                  "sender": decision.sender or "", "rule": decision.rule}
        verdict = decision.verdict
        if verdict is Verdict.ACCEPT:
            return SmtpReply(Outcome.ACCEPT, 250, "2.1.5" if decision.managed else "2.0.0",
                             clean_text(decision.rule))
        if verdict is Verdict.HOLD:
            return SmtpReply(self.hold, 250, "2.6.0",
                             clean_text(f"accepted for moderation by {decision.rule}"))
        if verdict is Verdict.DEFER:
            return SmtpReply(Outcome.DEFER, self.defer_code, self.defer_status,
                             clean_text(self.defer_text.format(**fields)))
        if verdict is Verdict.DISCARD and self.discard is Outcome.DISCARD:
            return SmtpReply(Outcome.DISCARD, 250, "2.7.0",
                             clean_text(f"discarded by {decision.rule}"))
        if decision.rule == "unknown-list":
            return SmtpReply(Outcome.REJECT, 550, "5.1.1",
                             clean_text(self.unknown_list_text.format(
                                 **{**fields, "recipient": decision.list or ""})))
        if decision.rule == "null-sender":
            return SmtpReply(Outcome.REJECT, self.reject_code, self.reject_status,
                             clean_text(self.null_sender_text.format(**fields)))
        if verdict is Verdict.DISCARD:
            text = self.discard_reject_text.format(**fields)
        else:
            text = decision.rejection_notice or self.reject_text.format(**fields)
        return SmtpReply(Outcome.REJECT, self.reject_code, self.reject_status,
                         clean_text(text))

    def error(self) -> SmtpReply:
        """The reply for internal trouble: always temporary, and the same whatever the
        trouble was (the reason goes to the log, never to the SMTP client)."""
        return SmtpReply(Outcome.DEFER, self.error_code, self.error_status,
                         clean_text(self.error_text))

