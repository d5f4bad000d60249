"""What goes on the wire for one decision (pure): the Exim reply line and the Postfix action.

The protocol modules and ``policyctl query --offline`` both use these helpers, so the
admin's command prints byte for byte what the daemon would send.  Nothing here does I/O.

Exim (``${readsocket}`` in a DATA ACL) gets ``<OUTCOME> <code> <x.y.z> <text>`` with no
trailing newline.  Postfix gets the value of ``action=``:

* not a list domain, or any protocol state but RCPT -> ``DUNNO``;
* ``[postfix] mode = safe`` (default): only the envelope-only SMTP-time rules act
  (``unknown-list``, ``null-sender``); everything else, the administrative addresses
  included, is ``DUNNO``, because Mailman decides from From: first;
* ``[postfix] mode = envelope``: the full decision on the envelope sender alone;
* an accepted post -> ``DUNNO`` (or ``OK`` with ``accept_action = ok``); HOLD ->
  ``HOLD <text>``; DISCARD -> ``DISCARD <text>``; REJECT and DEFER ->
  ``<code> <x.y.z> <text>``.
"""

from __future__ import annotations

import time

from .core.replies import Outcome, ReplyPolicy, SmtpReply
from .core.verdict import Decision, Query

__all__ = [
    "SAFE_RULES", "exim_reply_line", "postfix_action", "postfix_query", "query_result",
    "aggregate", "SEVERITY",
]

# The rules whose answer needs no header: the only ones that act in Postfix safe mode.
SAFE_RULES = frozenset({"unknown-list", "null-sender"})

# Exim aggregation over several lists: the most severe outcome wins, ties go to the
# first list in the request.
SEVERITY = {
    Outcome.ACCEPT: 0,
    Outcome.HOLD: 1,
    Outcome.DISCARD: 2,
    Outcome.REJECT: 3,
    Outcome.DEFER: 4,
}


def exim_reply_line(reply: SmtpReply) -> str:
    """``REJECT 550 5.7.1 text``: the whole Exim answer, no trailing newline."""
    return f"{reply.outcome._value_} {reply.code} {reply.status} {reply.text}"


def aggregate(replies) -> SmtpReply:
    """The one Exim answer for several lists: most severe outcome, first list on ties."""
    best = None
    for reply in replies:
        if best is None or SEVERITY[reply.outcome] > SEVERITY[best.outcome]:
            best = reply
    if best is None:
        raise ValueError("no reply to aggregate")
    return best


def postfix_action(decision: Decision | None, reply: SmtpReply, mode: str,
                   accept_action: str) -> str:
    """The value of ``action=`` for one RCPT decision.

    ``decision`` is ``None`` when there is no decision (no snapshot yet, an error inside
    the decision, a malformed request): ``reply`` is then sent as it is (a 4xx).
    """
    if decision is None:
        return _coded(reply)
    if not decision.managed:
        return "DUNNO"
    if mode == "safe" and decision.rule not in SAFE_RULES:
        return "DUNNO"
    outcome = reply.outcome
    if outcome is Outcome.ACCEPT:
        if mode == "safe" or decision.rule == "administrative-address":
            return "DUNNO"
        return "OK" if accept_action == "ok" else "DUNNO"
    if outcome is Outcome.HOLD:
        return f"HOLD {reply.text}"
    if outcome is Outcome.DISCARD:
        return f"DISCARD {reply.text}"
    return _coded(reply)


def _coded(reply: SmtpReply) -> str:
    return f"{reply.code} {reply.status} {reply.text}"


def postfix_query(query: Query) -> Query:
    """What Postfix can ask about ``query``: the envelope only, never a header."""
    if (query.from_header is None and query.reply_to_header is None
            and query.sender_header is None):
        return query
    return Query(query.recipient, query.envelope_sender)


def query_result(snapshot, query: Query, policy: ReplyPolicy, *, postfix_mode: str,
                 accept_action: str, decide, now: float | None = None,
                 loaded_at: float | None = None) -> dict:
    """The answer to ``policyctl query`` (live through the control socket, or offline).

    ``decide`` is ``policyd.core.chain.decide`` (passed in so this module stays a leaf).  The
    Exim line is for the query as given (headers included); the Postfix action is for
    what Postfix would send: the same recipient and envelope sender, no headers.
    """
    decision = decide(snapshot, query)
    reply = policy.reply(decision)
    pf_query = postfix_query(query)
    pf_decision = decision if pf_query is query else decide(snapshot, pf_query)
    pf_reply = reply if pf_decision is decision else policy.reply(pf_decision)
    now = time.time() if now is None else now
    loaded = snapshot.built_at if loaded_at is None else loaded_at
    return {
        "decision": decision.to_dict(),
        "reply": reply_dict(reply),
        "exim": exim_reply_line(reply),
        "postfix": postfix_action(pf_decision, pf_reply, postfix_mode, accept_action),
        "snapshot": {"version": snapshot.version, "age": round(max(0.0, now - loaded), 3)},
    }


def reply_dict(reply: SmtpReply) -> dict:
    return {"outcome": reply.outcome.value, "code": reply.code, "status": reply.status,
            "text": reply.text}
