"""``policyctl pattern ...`` and ``ban ...``: a list's accept/hold/reject/discard
_these_nonmembers entries, and banned addresses and ``^regex`` patterns, per list or
site-wide.  An entry that is an address is checked as an added member is."""

from __future__ import annotations

from ..core.verdict import Action, Mode
from ..errors import AlreadyExists, BadInput
from .arguments import KIND_NAMES, command, group, ignore_existing_flag, json_flag, position
from .output import EXIT_OK, Context, Unchanged


def register(commands) -> None:
    sub = group(commands, "pattern", "accept/hold/reject/discard_these_nonmembers")
    p = command(sub, "add", cmd_pattern_add, "add an address, ^regex or @list entry")
    p.add_argument("list", metavar="LIST")
    p.add_argument("kind", choices=KIND_NAMES)
    p.add_argument("pattern")
    p.add_argument("--position", type=position, metavar="N", help="insert at N (1 = first)")
    ignore_existing_flag(p, "an entry")
    p = command(sub, "remove", cmd_pattern_remove, "remove an entry")
    p.add_argument("list", metavar="LIST")
    p.add_argument("kind", choices=KIND_NAMES)
    p.add_argument("pattern")
    p = command(sub, "list", cmd_pattern_list, "list entries in order", aliases=["ls"])
    p.add_argument("list", metavar="LIST")
    p.add_argument("kind", nargs="?", choices=KIND_NAMES)
    json_flag(p)

    sub = group(commands, "ban", "banned addresses and ^regex patterns, per list or site-wide")
    for name, handler, text in (("add", cmd_ban_add, "ban addresses or patterns"),
                                ("remove", cmd_ban_remove, "lift bans")):
        p = command(sub, name, handler, text)
        p.add_argument("items", nargs="*", metavar="LIST PATTERN",
                       help="a LIST then one or more patterns; with --site only patterns")
        p.add_argument("--site", action="store_true", help="site-wide bans")
        if name == "add":
            ignore_existing_flag(p, "bans")
    p = command(sub, "list", cmd_ban_list, "list bans (all, one LIST, or --site)",
                aliases=["ls"])
    p.add_argument("items", nargs="*", metavar="LIST")
    p.add_argument("--site", action="store_true")
    json_flag(p)


# --- patterns ------------------------------------------------------------------------------


def cmd_pattern_add(ctx: Context) -> int:
    from ..store import queries as q

    kind = q.parse_kind(ctx.args.kind)
    try:
        with ctx.store().write() as session:
            mlist = q.find_list(session, ctx.args.list)
            text = q.check_pattern(ctx.args.pattern)
            number = q.add_pattern(session, mlist, kind, ctx.args.pattern, ctx.args.position)
            address, mode = mlist.posting_address, mlist.mode
    except AlreadyExists as error:
        return ctx.left_as_it_is(error)
    ctx.print(f"{address}: {kind.label}_these_nonmembers #{number}: {text}")
    if text.startswith("@") and kind is not Action.ACCEPT and mode is Mode.MAILMAN3:
        ctx.warn(f"Mailman 3 reads @list entries only in accept_these_nonmembers; "
                 f"{text} has no effect in {kind.label}_these_nonmembers of a mailman3 list")
    return EXIT_OK


def cmd_pattern_remove(ctx: Context) -> int:
    from ..store import queries as q

    kind = q.parse_kind(ctx.args.kind)
    with ctx.store().write() as session:
        mlist = q.find_list(session, ctx.args.list)
        q.remove_pattern(session, mlist, kind, ctx.args.pattern)
        address = mlist.posting_address
    ctx.print(f"{address}: removed {ctx.args.pattern.strip()} from "
              f"{kind.label}_these_nonmembers")
    return EXIT_OK


def cmd_pattern_list(ctx: Context) -> int:
    from ..store import queries as q

    kind = q.parse_kind(ctx.args.kind) if ctx.args.kind else None
    with ctx.store().read() as session:
        mlist = q.find_list(session, ctx.args.list)
        rows = q.patterns(session, mlist, kind)
    if ctx.args.json:
        ctx.json([{"kind": k.label, "position": p, "pattern": t} for k, p, t in rows])
        return EXIT_OK
    for k, number, text in rows:
        ctx.print(f"{k.label:<8} {number:>3}  {text}")
    return EXIT_OK


# --- bans ----------------------------------------------------------------------------------


def _ban_scope(ctx: Context):
    """(list reference or None for --site, patterns) from ``[LIST] PATTERN...``."""
    items = list(ctx.args.items)
    if ctx.args.site:
        target = None
    else:
        if not items:
            raise BadInput("give a LIST, or --site for site-wide bans")
        target = items.pop(0)
    if not items:
        raise BadInput("give one or more addresses or ^regex patterns")
    return target, items


def _ban_list(session, target):
    from ..store import queries as q

    return None if target is None else q.find_list(session, target)


def cmd_ban_add(ctx: Context) -> int:
    from ..store import queries as q

    target, items = _ban_scope(ctx)
    added, existing = [], []
    with ctx.write() as session:
        mlist = _ban_list(session, target)
        for item in items:
            try:
                added.append(q.add_ban(session, mlist, item))
            except AlreadyExists as error:
                # add_ban checks before it writes: skipping it leaves nothing behind.
                if not ctx.args.ignore_existing:
                    raise
                existing.append(str(error))
        where = "site-wide" if mlist is None else f"on {mlist.posting_address}"
        if not added:
            raise Unchanged()
    if added:
        ctx.print(f"banned {where}: {', '.join(added)}")
    for message in existing:
        ctx.print(f"{message}, left as it is")
    return EXIT_OK


def cmd_ban_remove(ctx: Context) -> int:
    from ..store import queries as q

    target, items = _ban_scope(ctx)
    with ctx.store().write() as session:
        mlist = _ban_list(session, target)
        for item in items:
            q.remove_ban(session, mlist, item)
        where = "site-wide" if mlist is None else f"on {mlist.posting_address}"
    ctx.print(f"unbanned {where}: {', '.join(i.strip() for i in items)}")
    return EXIT_OK


def cmd_ban_list(ctx: Context) -> int:
    from ..store import queries as q

    items = list(ctx.args.items)
    if len(items) > 1:
        raise BadInput("ban list takes at most one LIST")
    with ctx.store().read() as session:
        if ctx.args.site:
            scopes = [("site", None)]
        elif items:
            mlist = q.find_list(session, items[0])
            scopes = [(mlist.posting_address, mlist)]
        else:
            scopes = [("site", None)] + [(m.posting_address, m) for m in q.all_lists(session)]
        result = {name: q.bans(session, mlist) for name, mlist in scopes}
    if ctx.args.json:
        ctx.json(result)
        return EXIT_OK
    for name, patterns in result.items():
        for pattern in patterns:
            ctx.print(f"{name}  {pattern}")
    return EXIT_OK
