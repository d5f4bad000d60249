"""The vocabulary every other module shares: verdicts, Mailman actions, queries, decisions.

Nothing here knows about SMTP codes, wire formats, SQL or Twisted.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .message import Message


class Verdict(enum.Enum):
    """What policyd thinks should happen to the message, before any SMTP mapping."""

    ACCEPT = "accept"
    HOLD = "hold"
    REJECT = "reject"
    DISCARD = "discard"
    DEFER = "defer"


class Action(enum.IntEnum):
    """Mailman 3's moderation actions, with the integers Mailman stores.

    ``DEFER`` is Mailman's "no opinion, let the next rule decide"; it is never an SMTP 4xx.
    """

    HOLD = 0
    REJECT = 1
    DISCARD = 2
    ACCEPT = 3
    DEFER = 4

    @classmethod
    def from_name(cls, name: str) -> "Action":
        try:
            return cls[name.strip().upper()]
        except KeyError:
            allowed = ", ".join(a.name.lower() for a in cls)
            raise ValueError(f"unknown action {name!r} (allowed: {allowed})") from None

    @property
    def label(self) -> str:
        return self.name.lower()


ACTION_VERDICT = {
    Action.ACCEPT: Verdict.ACCEPT,
    Action.HOLD: Verdict.HOLD,
    Action.REJECT: Verdict.REJECT,
    Action.DISCARD: Verdict.DISCARD,
}


class Mode(enum.Enum):
    """Whose moderation semantics a list follows."""

    MAILMAN3 = "mailman3"
    MAILMAN2 = "mailman2"


class Role(enum.Enum):
    """Which of a list's addresses a recipient is."""

    POST = "post"
    REQUEST = "request"
    OWNER = "owner"
    JOIN = "join"
    LEAVE = "leave"
    CONFIRM = "confirm"
    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"
    BOUNCES = "bounces"


class Query(NamedTuple):
    """One question: may this message go to this list address?

    ``envelope_sender`` is ``""`` for the null sender ``<>``.  The header values are raw
    (unfolded or not, possibly RFC 2047 encoded, possibly several addresses; several
    headers of one name joined by newlines).  ``None`` means the header is absent or, on
    the Postfix path, unknown.

    ``message`` is the message itself when the MTA sent it (Exim's ``headers=``, ``body=``,
    ``size=``): its header fields one by one, the visible start of the body and the size
    (``core.message.Message``).  With it, the senders come from its From:, Reply-To: and
    Sender: fields, each field on its own, and the content rules run; without it (Postfix,
    an older Exim ACL) those rules say in the trace that they could not be evaluated.

    A tuple, not a frozen dataclass: one is made per query, and the Decider's memo hashes
    it; a tuple does both in C.
    """

    recipient: str
    envelope_sender: str
    from_header: str | None = None
    reply_to_header: str | None = None
    sender_header: str | None = None
    message: "Message | None" = None


class TraceStep(NamedTuple):
    """One rule consulted: whether it hit, and why."""

    rule: str
    hit: bool
    detail: str

    def to_dict(self) -> dict:
        return {"rule": self.rule, "hit": self.hit, "detail": self.detail}


class Decision(NamedTuple):
    """The answer for one query, with the rule that decided and the whole trace.

    ``list`` is ``None`` when the recipient is not an address policyd manages; protocol
    adapters then have no opinion (Postfix ``DUNNO``).
    """

    verdict: Verdict
    rule: str
    reason: str
    action: Action | None = None
    sender: str | None = None
    list: str | None = None
    role: Role | None = None
    rejection_notice: str | None = None
    senders: tuple[str, ...] = ()
    trace: tuple[TraceStep, ...] = ()

    @property
    def managed(self) -> bool:
        return self.list is not None

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict.value,
            "rule": self.rule,
            "reason": self.reason,
            "action": self.action.label if self.action is not None else None,
            "sender": self.sender,
            "list": self.list,
            "role": self.role.value if self.role is not None else None,
            "senders": list(self.senders),
            "trace": [step.to_dict() for step in self.trace],
        }
