"""``policyctl pending``, ``approve``, ``reject``, ``discard``: the moderator's side of
SMTP-time moderation (``smtp_moderation = moderate``, docs/moderation.md).

A decision is written to the store's ``moderation_tickets``; the daemons read it within
a few seconds and apply it when the sender's MTA retries: approve accepts the post,
reject answers ``550 5.7.1`` with the reason (the sender's own MTA tells its user: no
bounce from the list), discard accepts and drops it."""

from __future__ import annotations

from datetime import datetime, timezone

from ..core.moderation import Decision, displayable
from .arguments import command, json_flag
from .output import EXIT_OK, Context


def register(commands) -> None:
    p = command(commands, "pending", cmd_pending,
                "list the posts held for a moderator at SMTP time (smtp_moderation = "
                "moderate)")
    p.add_argument("list", metavar="LIST", nargs="?", help="only this list's posts")
    json_flag(p)
    p = command(commands, "approve", cmd_approve,
                "approve a held post: the sender's next retry is accepted")
    p.add_argument("ticket", metavar="TICKET")
    p = command(commands, "reject", cmd_reject,
                "reject a held post: the sender's next retry gets 550 5.7.1 with the reason")
    p.add_argument("ticket", metavar="TICKET")
    p.add_argument("--reason", metavar="TEXT", default="",
                   help="one line for the SMTP reply (default: the list's generic text)")
    p = command(commands, "discard", cmd_discard,
                "discard a held post: the sender's next retry is accepted and dropped")
    p.add_argument("ticket", metavar="TICKET")


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def cmd_pending(ctx: Context) -> int:
    from ..store import moderation, queries as q

    with ctx.store().read() as session:
        list_ = None
        if ctx.args.list:
            list_ = q.find_list(session, ctx.args.list).posting_address
        tickets = moderation.pending_tickets(session, list_)
    # The peer's values as the daemon stores them now, whatever an older one stored.
    rows = [{"ticket": t.id, "list": t.key.list, "sender": displayable(t.key.sender),
             "subject": displayable(t.subject), "message_id": displayable(t.key.message_id),
             "client": displayable(t.client), "first_seen": _when(t.first_seen),
             "attempts": t.attempts} for t in tickets]
    if ctx.args.json:
        ctx.json(rows)
        return EXIT_OK
    if not rows:
        ctx.print("no posts pending")
    for row in rows:
        ctx.print(f"{row['ticket']}  {row['list']}  from {row['sender'] or '<>'}  "
                  f"first seen {row['first_seen']}  attempts {row['attempts']}")
        ctx.print(f"        subject: {row['subject'] or '-'}  message-id: "
                  f"{row['message_id'] or '-'}  client: {row['client'] or '-'}")
    return EXIT_OK


def _decide(ctx: Context, decision: Decision, reason: str = "") -> int:
    from ..store import moderation

    with ctx.store().write() as session:
        # Stamped by the store's clock, which the daemons' clocks agree with (this
        # host's may not: the daemons read back decisions by the time they carry).
        ticket = moderation.decide_ticket(session, ctx.args.ticket, decision,
                                          moderation.store_clock(session.connection()),
                                          reason)
    past = {Decision.APPROVE: "approved", Decision.REJECT: "rejected",
            Decision.DISCARD: "discarded"}[decision]
    ctx.print(f"{past} ticket {ticket.id} ({ticket.key.list}, from "
              f"{ticket.key.sender or '<>'}): applied at the sender's next retry")
    return EXIT_OK


def cmd_approve(ctx: Context) -> int:
    return _decide(ctx, Decision.APPROVE)


def cmd_reject(ctx: Context) -> int:
    return _decide(ctx, Decision.REJECT, ctx.args.reason)


def cmd_discard(ctx: Context) -> int:
    return _decide(ctx, Decision.DISCARD)
