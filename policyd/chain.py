"""The chains as declarative tables, and ``decide()``: one query in, one traced decision out.

Pure: no Twisted, no SQLAlchemy, no clock.  The order of ``MAILMAN3_CHAIN`` is Mailman
3.3.10's built-in chain reduced to the rules that can be decided from the envelope and the
originator headers (dmarc, approved, loop, header-match and the content checks need the
message body or site configuration policyd does not have; see README "Differences").
"""

from __future__ import annotations

from .rules import (
    AdministrativeAddress,
    BannedAddress,
    Context,
    Emergency,
    Hit,
    Mailman2MemberModeration,
    Mailman2NonmemberModeration,
    MemberModeration,
    Miss,
    NonmemberModeration,
    NoSenders,
    NullSender,
    Rule,
    UnknownList,
    mode_senders,
)
from .snapshot import Snapshot
from .verdict import Decision, Mode, Query, TraceStep, Verdict

SMTP_CHAIN: tuple[Rule, ...] = (UnknownList(), NullSender(), AdministrativeAddress())

MAILMAN3_CHAIN: tuple[Rule, ...] = (
    NoSenders(),
    BannedAddress(),
    Emergency(),
    MemberModeration(),
    NonmemberModeration(),
)

# Mailman 2.1's pipeline runs Moderate before Emergency, so an emergency list still
# rejects or discards what moderation rejects or discards.
MAILMAN2_CHAIN: tuple[Rule, ...] = (
    Mailman2MemberModeration(),
    Mailman2NonmemberModeration(),
    Emergency(),
)

CHAINS = {Mode.MAILMAN3: MAILMAN3_CHAIN, Mode.MAILMAN2: MAILMAN2_CHAIN}

# What decide() runs: the SMTP-time rules, then the list's Mailman chain.
_FULL_CHAINS = {mode: SMTP_CHAIN + chain for mode, chain in CHAINS.items()}

ALL_RULES: tuple[Rule, ...] = SMTP_CHAIN + MAILMAN3_CHAIN + MAILMAN2_CHAIN


def decide(snapshot: Snapshot, query: Query) -> Decision:
    target = snapshot.resolve(query.recipient)
    if not target.managed_domain:
        return Decision(
            verdict=Verdict.ACCEPT,
            rule="not-managed",
            reason=f"{query.recipient!r} is not in a list domain: no opinion",
            trace=(TraceStep("not-managed", True, "recipient domain is not managed"),),
        )
    policy = target.list
    senders = mode_senders(policy.mode, query) if policy is not None else ()
    ctx = Context(snapshot, query, target, senders)
    trace: list[TraceStep] = []
    note: Miss | None = None
    for rule in _FULL_CHAINS[policy.mode] if policy is not None else SMTP_CHAIN:
        result = rule.check(ctx)
        if isinstance(result, Hit):
            trace.append(TraceStep(rule.name, True, result.reason))
            return _decision(ctx, rule.name, result.verdict, result.reason, result.action,
                             result.sender, trace)
        trace.append(TraceStep(rule.name, False, result.detail))
        if result.note is not None:
            note = result
    reason = "no rule held, rejected or discarded the post"
    if note is not None:
        reason = f"{note.note}; {reason}"
    trace.append(TraceStep("accept", True, reason))
    return _decision(ctx, "accept", Verdict.ACCEPT, reason,
                     note.action if note else None, note.sender if note else None, trace)


def _decision(ctx: Context, rule, verdict, reason, action, sender, trace) -> Decision:
    policy = ctx.target.list
    return Decision(
        verdict=verdict,
        rule=rule,
        reason=reason,
        action=action,
        sender=sender,
        list=policy.posting_address if policy is not None else ctx.target.address,
        role=ctx.target.role,
        rejection_notice=policy.rejection_notice if policy is not None else None,
        senders=ctx.senders,
        trace=tuple(trace),
    )
