"""``policyctl member ...``, ``nonmember ...`` and ``user ...``: who is subscribed to a
list with which role and moderation action, and users (one person's several addresses).

Addresses that are added are checked as Mailman checks them (``policyd.core.validate``,
through ``queries.parse_address``): one that no sender can ever be is bad input, with its
line number in a ``--file``.  Addresses that are looked up (remove, set, unlink, prefer)
are only normalised, so that such an address stored earlier can still be removed.
"""

from __future__ import annotations

from ..core.validate import non_ascii_local
from ..core.verdict import Action, Mode
from ..errors import AlreadyExists, BadInput
from .arguments import (
    ACTION_NAMES,
    ROLE_NAMES,
    UNSET,
    action_or_default,
    command,
    group,
    ignore_existing_flag,
    json_flag,
)
from .output import EXIT_OK, Context, Unchanged, plural, summary


def register(commands) -> None:
    for noun, fixed in (("member", None), ("nonmember", "nonmember")):
        _register_memberships(commands, noun, fixed)

    sub = group(commands, "user", "users: one person's several addresses")
    p = command(sub, "add", cmd_user_add, "create a user (first address is preferred)")
    p.add_argument("name")
    p.add_argument("addresses", nargs="*", metavar="ADDRESS")
    p.add_argument("--display-name", metavar="TEXT")
    ignore_existing_flag(p, "a user")
    p = command(sub, "link", cmd_user_link, "link addresses to a user")
    p.add_argument("name")
    p.add_argument("addresses", nargs="+", metavar="ADDRESS")
    p = command(sub, "unlink", cmd_user_unlink, "unlink addresses from their user")
    p.add_argument("addresses", nargs="+", metavar="ADDRESS")
    p = command(sub, "prefer", cmd_user_prefer, "set a user's preferred address")
    p.add_argument("name")
    p.add_argument("address")
    p = command(sub, "show", cmd_user_show, "show a user")
    p.add_argument("name")
    json_flag(p)
    p = command(sub, "ls", cmd_user_ls, "list users", aliases=["list"])
    json_flag(p)
    p = command(sub, "remove", cmd_user_remove, "remove a user (its addresses stay)")
    p.add_argument("name")


def _register_memberships(commands, noun: str, fixed: str | None) -> None:
    word = noun + "s"
    sub = group(commands, noun, f"{word} of a list" + (" (and owners, moderators with --role)"
                                                       if fixed is None else ""))

    def addresses(p, *, required_help="addresses"):
        p.add_argument("list", metavar="LIST")
        p.add_argument("addresses", nargs="*", metavar="ADDRESS", help=required_help)
        p.add_argument("--file", metavar="PATH|-",
                       help="more addresses, one per line, each optionally followed by "
                            "an action ('-' reads stdin)")
        if fixed is None:
            p.add_argument("--role", choices=ROLE_NAMES, default=None,
                           help="default member")
        p.set_defaults(fixed_role=fixed or "member")

    p = command(sub, "add", cmd_member_add, f"add {word} (bulk with --file)")
    addresses(p)
    p.add_argument("--action", type=action_or_default, default=None, metavar="ACTION",
                   help=f"moderation action: {'|'.join(ACTION_NAMES)}|default "
                        "(default: the list default)")
    if fixed is None:
        p.add_argument("--user", metavar="NAME",
                       help="link the addresses to this user (created if new); without "
                            "addresses, subscribe the user through its preferred address")
    ignore_existing_flag(p, word)
    p = command(sub, "remove", cmd_member_remove, f"remove {word}")
    addresses(p)
    p = command(sub, "set", cmd_member_set, f"set the moderation action of {word}")
    addresses(p)
    p.add_argument("--action", type=action_or_default, default=UNSET, metavar="ACTION",
                   help=f"{'|'.join(ACTION_NAMES)}|default")
    p = command(sub, "ls", cmd_member_ls, f"list {word}", aliases=["list"])
    p.add_argument("list", metavar="LIST")
    if fixed is None:
        p.add_argument("--role", choices=ROLE_NAMES, default=None)
    p.set_defaults(fixed_role=fixed or "member")
    json_flag(p)


# --- members and nonmembers ----------------------------------------------------------------


def _role(ctx: Context):
    from ..store.models import MemberRole

    name = getattr(ctx.args, "role", None) or ctx.args.fixed_role
    return MemberRole.from_name(name)


def _entries(ctx: Context, default_action: Action | None, *, need_one: bool = True,
             strict: bool = True):
    """The addresses of a member command: arguments and/or ``--file`` lines; ``strict``
    for addresses to be stored."""
    from ..store import queries as q

    entries = q.entries_from(ctx.args.addresses, default_action, strict=strict)
    if ctx.args.file:
        source = "stdin" if ctx.args.file == "-" else ctx.args.file
        entries += q.parse_entries(ctx.lines(ctx.args.file), default_action, source,
                                   strict=strict)
    if need_one and not entries:
        raise BadInput("no addresses given (arguments, or --file PATH|-)")
    return entries


def _exist_already(role, address: str, emails: list[str]) -> AlreadyExists:
    if len(emails) == 1:
        return AlreadyExists(f"{role.label} {emails[0]} of {address}")
    return AlreadyExists(f"{plural(len(emails), role.label)} of {address}", plural=True,
                         detail=summary(emails))


def cmd_member_add(ctx: Context) -> int:
    from ..store import queries as q

    role = _role(ctx)
    user_name = getattr(ctx.args, "user", None)
    entries = _entries(ctx, ctx.args.action, need_one=user_name is None)
    with ctx.write() as session:
        mlist = q.find_list(session, ctx.args.list)
        user = None
        created_user = False
        if user_name is not None:
            user, created_user = q.get_or_create_user(session, user_name)
        if entries:
            added, existing = q.add_members(session, mlist, entries, role, user)
        else:
            subscribed = q.subscribe_user(session, mlist, user, role, ctx.args.action)
            preferred = q.user_info(session, user)["preferred_address"]
            added, existing = ([preferred], []) if subscribed else ([], [preferred])
        address, mode = mlist.posting_address, mlist.mode
        if existing and not ctx.args.ignore_existing:
            # Raised inside the transaction: nothing of this command is written.
            raise _exist_already(role, address, existing)
        if not added and user is None:
            raise Unchanged()
    if created_user:
        ctx.print(f"created user {user_name}")
    if user is not None and entries:
        ctx.print(f"linked to user {user_name}: {summary([e.email for e in entries])}")
    how = f" (user {user_name}, through its preferred address)" if not entries else ""
    ctx.print(f"{address}: added {plural(len(added), role.label)}{how}"
              + (f": {summary(added)}" if 0 < len(added) <= 5 else ""))
    if existing:
        ctx.print(f"{address}: already {plural(len(existing), role.label)}, left unchanged: "
                  f"{summary(existing)}")
    unseen = [e.email for e in entries if non_ascii_local(e.email)]
    if unseen and mode is Mode.MAILMAN3:
        ctx.warn(f"Mailman 3 keeps no sender whose local part is not ASCII; on the mailman3 "
                 f"list {address} these never match: {summary(unseen)}")
    return EXIT_OK


def cmd_member_remove(ctx: Context) -> int:
    from ..store import queries as q

    role = _role(ctx)
    entries = _entries(ctx, None, strict=False)
    with ctx.store().write() as session:
        mlist = q.find_list(session, ctx.args.list)
        count = q.remove_members(session, mlist, entries, role)
        address = mlist.posting_address
    ctx.print(f"{address}: removed {plural(count, role.label)}")
    return EXIT_OK


def cmd_member_set(ctx: Context) -> int:
    from ..store import queries as q

    role = _role(ctx)
    if ctx.args.action is UNSET and not ctx.args.file:
        raise BadInput("give --action ACTION (or 'default'), or --file lines with actions")
    default = None if ctx.args.action is UNSET else ctx.args.action
    entries = _entries(ctx, default, strict=False)
    with ctx.store().write() as session:
        mlist = q.find_list(session, ctx.args.list)
        count = q.set_members(session, mlist, entries, role)
        address = mlist.posting_address
    actions = sorted({q.action_label(e.action) for e in entries})
    ctx.print(f"{address}: set the action of {plural(count, role.label)} to "
              f"{', '.join(actions)}")
    return EXIT_OK


def cmd_member_ls(ctx: Context) -> int:
    from ..store import queries as q

    role = _role(ctx)
    with ctx.store().read() as session:
        mlist = q.find_list(session, ctx.args.list)
        rows = q.members(session, mlist, role)
    if ctx.args.json:
        ctx.json([{**row, "action": q.action_label(row["action"])} for row in rows])
        return EXIT_OK
    for row in rows:
        extra = f"  (user {row['user']})" if row["user"] else ""
        ctx.print(f"{row['address']}  {q.action_label(row['action'])}{extra}")
    return EXIT_OK


# --- users ---------------------------------------------------------------------------------


def cmd_user_add(ctx: Context) -> int:
    from ..store import queries as q

    entries = q.entries_from(ctx.args.addresses, None)
    try:
        with ctx.store().write() as session:
            user = q.add_user(session, ctx.args.name, entries, ctx.args.display_name)
            info = q.user_info(session, user)
    except AlreadyExists as error:
        return ctx.left_as_it_is(error)
    ctx.print(f"added user {info['name']}"
              + (f" with {', '.join(info['addresses'])}" if info["addresses"] else ""))
    return EXIT_OK


def cmd_user_link(ctx: Context) -> int:
    from ..store import queries as q

    entries = q.entries_from(ctx.args.addresses, None)
    with ctx.store().write() as session:
        user = q.find_user(session, ctx.args.name)
        linked = q.link_addresses(session, user, entries)
    ctx.print(f"user {ctx.args.name}: linked {plural(len(linked), 'address')}"
              + (f": {summary(linked)}" if linked else " (all were linked already)"))
    return EXIT_OK


def cmd_user_unlink(ctx: Context) -> int:
    from ..store import queries as q

    emails = [e.email for e in q.entries_from(ctx.args.addresses, None, strict=False)]
    with ctx.store().write() as session:
        q.unlink_addresses(session, emails)
    ctx.print(f"unlinked {summary(emails)}")
    return EXIT_OK


def cmd_user_prefer(ctx: Context) -> int:
    from ..store import queries as q

    email, _ = q.parse_address(ctx.args.address, strict=False)
    with ctx.store().write() as session:
        user = q.find_user(session, ctx.args.name)
        q.set_preferred(session, user, email)
    ctx.print(f"user {ctx.args.name}: preferred address {email}")
    return EXIT_OK


def cmd_user_show(ctx: Context) -> int:
    from ..store import queries as q

    with ctx.store().read() as session:
        info = q.user_info(session, q.find_user(session, ctx.args.name))
    if ctx.args.json:
        ctx.json(info)
        return EXIT_OK
    ctx.print(info["name"] + (f" ({info['display_name']})" if info["display_name"] else ""))
    for email in info["addresses"]:
        ctx.print(f"  {email}" + ("  (preferred)" if email == info["preferred_address"] else ""))
    for sub in info["subscriptions"]:
        ctx.print(f"  {sub['role']} of {sub['list']} ({sub['action']})")
    return EXIT_OK


def cmd_user_ls(ctx: Context) -> int:
    from ..store import queries as q

    with ctx.store().read() as session:
        rows = q.all_users(session)
    if ctx.args.json:
        ctx.json([{"name": name, "addresses": count} for name, count in rows])
        return EXIT_OK
    for name, count in rows:
        ctx.print(f"{name}  {plural(count, 'address')}")
    return EXIT_OK


def cmd_user_remove(ctx: Context) -> int:
    from ..store import queries as q

    with ctx.store().write() as session:
        q.remove_user(session, ctx.args.name)
    ctx.print(f"removed user {ctx.args.name} (its addresses and direct memberships stay)")
    return EXIT_OK
