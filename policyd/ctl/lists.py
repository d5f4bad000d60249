"""``policyctl domain ...`` and ``policyctl list ...``: mail hosts, alias domains, and the
lists with their settings."""

from __future__ import annotations

import argparse

from ..core.dmarc import DmarcAction
from ..core.moderation import SmtpModeration
from ..core.verdict import Mode
from ..errors import AlreadyExists, BadInput
from .arguments import (
    ACTION_NAMES,
    KIND_NAMES,
    action,
    command,
    group,
    ignore_existing_flag,
    json_flag,
    on_off,
)
from .output import EXIT_OK, Context, show_value


def register(commands) -> None:
    sub = group(commands, "domain", "mail hosts and alias domains")
    p = command(sub, "add", cmd_domain_add, "add a mail host, or an alias domain")
    p.add_argument("name")
    p.add_argument("--alias-of", metavar="HOST",
                   help="make NAME an alias domain of the mail host HOST")
    ignore_existing_flag(p, "a domain")
    p = command(sub, "remove", cmd_domain_remove, "remove a domain (and its alias domains)")
    p.add_argument("name")
    p = command(sub, "list", cmd_domain_list, "list domains", aliases=["ls"])
    json_flag(p)

    sub = group(commands, "list", "mailing lists and their settings")
    p = command(sub, "add", cmd_list_add, "create a list (and its domain if new)")
    p.add_argument("list", metavar="ADDRESS", help="posting address, e.g. discuss@lists.example.org")
    p.add_argument("--list-id", metavar="ID", help="default: name.mail.host")
    _list_settings(p, True)
    ignore_existing_flag(p, "a list")
    p = command(sub, "set", cmd_list_set, "change a list's settings")
    p.add_argument("list", metavar="LIST")
    _list_settings(p, False)
    p = command(sub, "show", cmd_list_show, "show a list's settings, patterns and bans")
    p.add_argument("list", metavar="LIST")
    json_flag(p)
    p = command(sub, "remove", cmd_list_remove,
                "remove a list with its memberships, patterns and bans")
    p.add_argument("list", metavar="LIST")
    p = command(sub, "ls", cmd_list_ls, "list the lists", aliases=["list"])
    json_flag(p)


def _list_settings(p, creating: bool) -> None:
    p.add_argument("--display-name", metavar="TEXT")
    p.add_argument("--mode", choices=[m.value for m in Mode],
                   help="whose moderation semantics (default mailman3)" if creating
                   else "whose moderation semantics")
    p.add_argument("--emergency", type=on_off, metavar="on|off")
    p.add_argument("--default-member-action", type=action, metavar="ACTION",
                   help=f"{'|'.join(ACTION_NAMES)}" + (" (default defer)" if creating else ""))
    p.add_argument("--default-nonmember-action", type=action, metavar="ACTION",
                   help=f"{'|'.join(ACTION_NAMES)}" + (" (default hold)" if creating else ""))
    p.add_argument("--rejection-notice", metavar="TEXT",
                   help="the SMTP text of a rejection ('' clears it)")
    if creating:
        return
    # The settings of the rules that read the message (Exim's headers=/body=/size=).
    p.add_argument("--moderator-password", action="store_true",
                   help="set the moderator password (Approved: header), read from a "
                        "prompt or the first line of standard input, never the command "
                        "line; stored hashed as Mailman hashes it; empty clears it")
    p.add_argument("--max-message-size", type=int, metavar="KB", help="0: off")
    p.add_argument("--max-num-recipients", type=int, metavar="N", help="0: off")
    p.add_argument("--require-explicit-destination", type=on_off, metavar="on|off")
    p.add_argument("--acceptable-alias", action="append", metavar="ADDRESS|^REGEX",
                   dest="acceptable_aliases",
                   help="repeat for several; replaces the list's aliases ('' clears); "
                   "stored lower-cased, as Mailman stores them")
    p.add_argument("--administrivia", type=on_off, metavar="on|off")
    p.add_argument("--newsgroup-moderated", type=on_off, metavar="on|off")
    p.add_argument("--bounce-matching-headers", metavar="TEXT",
                   help="Mailman 2.1's 'Header: regex' lines ('' clears)")
    p.add_argument("--smtp-moderation", choices=[m.value for m in SmtpModeration],
                   help="SMTP-time moderation of the posts held as from a nonmember: "
                        "defer first attempts (greylist) or hold them with a ticket for "
                        "policyctl approve|reject|discard (moderate); see "
                        "docs/moderation.md")
    p.add_argument("--dmarc-mitigate-action", choices=[a.label for a in DmarcAction],
                   help="Mailman's DMARC mitigation; at SMTP time reject and discard "
                        "refuse or drop a post From: a domain whose DMARC policy is "
                        "reject or quarantine (a DNS lookup, [dmarc]); munge_from and "
                        "wrap_message are Mailman's later (accepted here)")
    p.add_argument("--dmarc-mitigate-unconditionally", type=on_off, metavar="on|off",
                   help="Mailman munges or wraps every post (no SMTP-time effect)")
    p.add_argument("--dmarc-quarantine", type=on_off, metavar="on|off",
                   help="a mailman2-mode list: a DMARC policy of quarantine counts as "
                        "reject does (Mailman 2's dmarc_quarantine_moderation_action; "
                        "default on); Mailman 3 always counts it")
    p.add_argument("--dmarc-address", action="append", metavar="ADDRESS|^REGEX",
                   dest="dmarc_addresses",
                   help="From: addresses always mitigated; repeat for several; replaces "
                        "the list's ('' clears)")
    p.add_argument("--header-match", nargs=3, action="append", dest="header_matches",
                   metavar=("HEADER", "PATTERN", "ACTION"),
                   help="repeat for several, in order; replaces the list's header "
                        "matches; ACTION accept|hold|reject|discard|default (Mailman's "
                        "jump_chain, hold); --header-match '' '' '' clears")


# --- domains -------------------------------------------------------------------------------


def cmd_domain_add(ctx: Context) -> int:
    from ..store import queries as q

    try:
        with ctx.store().write() as session:
            domain = q.add_domain(session, ctx.args.name, ctx.args.alias_of)
            name = domain.name
    except AlreadyExists as error:
        return ctx.left_as_it_is(error)
    suffix = f" (alias of {q.parse_domain(ctx.args.alias_of)})" if ctx.args.alias_of else ""
    ctx.print(f"added domain {name}{suffix}")
    return EXIT_OK


def cmd_domain_remove(ctx: Context) -> int:
    from ..store import queries as q

    with ctx.store().write() as session:
        aliases = q.remove_domain(session, ctx.args.name)
    ctx.print(f"removed domain {q.parse_domain(ctx.args.name)}"
              + (f" and its alias domains {', '.join(aliases)}" if aliases else ""))
    return EXIT_OK


def cmd_domain_list(ctx: Context) -> int:
    from ..store import queries as q

    with ctx.store().read() as session:
        rows = q.domains(session)
    if ctx.args.json:
        ctx.json([{"domain": name, "alias_of": alias} for name, alias in rows])
        return EXIT_OK
    for name, alias in rows:
        ctx.print(f"{name} (alias of {alias})" if alias else name)
    return EXIT_OK


# --- lists ---------------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> dict:
    changes = {}
    for key in ("display_name", "mode", "emergency", "default_member_action",
                "default_nonmember_action", "rejection_notice", "max_message_size",
                "max_num_recipients", "require_explicit_destination", "administrivia",
                "newsgroup_moderated", "bounce_matching_headers", "acceptable_aliases",
                "smtp_moderation", "dmarc_mitigate_action",
                "dmarc_mitigate_unconditionally", "dmarc_addresses", "dmarc_quarantine"):
        value = getattr(args, key, None)
        if value is not None:
            changes[key] = Mode(value) if key == "mode" else value
    matches = getattr(args, "header_matches", None)
    if matches is not None:
        changes["header_matches"] = [
            (header, pattern, None if act.strip().lower() == "default" else act)
            for header, pattern, act in matches if header or pattern]
    if getattr(args, "moderator_password", False):
        changes["moderator_password"] = _read_password()
    return changes


def _read_password() -> str | None:
    """The moderator password from a prompt (a terminal) or the first line of standard
    input, hashed at once (Mailman's passlib scheme); ``None`` for an empty one."""
    import getpass
    import sys

    from ..core.passwords import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("moderator password: ")
        if password and getpass.getpass("again: ") != password:
            raise BadInput("the two passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    return hash_password(password) if password else None


def cmd_list_add(ctx: Context) -> int:
    from ..store import queries as q

    settings = _settings(ctx.args)
    try:
        with ctx.store().write() as session:
            row, created = q.add_list(session, ctx.args.list, list_id=ctx.args.list_id,
                                      **settings)
            info = _list_info(session, row)
    except AlreadyExists as error:
        return ctx.left_as_it_is(error)
    if created:
        ctx.print(f"added domain {info['address'].split('@', 1)[1]}")
    ctx.print(f"added list {info['address']}")
    _print_list(ctx, info)
    return EXIT_OK


def cmd_list_set(ctx: Context) -> int:
    from ..store import queries as q

    changes = _settings(ctx.args)
    if not changes:
        raise BadInput("nothing to change: give one or more of --display-name, --mode, "
                       "--emergency, --default-member-action, --default-nonmember-action, "
                       "--rejection-notice, --moderator-password, --max-message-size, "
                       "--max-num-recipients, --require-explicit-destination, "
                       "--acceptable-alias, --administrivia, --newsgroup-moderated, "
                       "--bounce-matching-headers, --header-match, --smtp-moderation, "
                       "--dmarc-mitigate-action, --dmarc-mitigate-unconditionally, "
                       "--dmarc-address")
    with ctx.store().write() as session:
        row = q.set_list(session, ctx.args.list, **changes)
        info = _list_info(session, row)
    ctx.print(f"changed {info['address']}: " + ", ".join(
        f"{key.replace('_', ' ')} = {show_value(info[key])}" for key in changes))
    return EXIT_OK


def cmd_list_show(ctx: Context) -> int:
    from ..store import queries as q

    with ctx.store().read() as session:
        info = _list_info(session, q.find_list(session, ctx.args.list), details=True)
    if ctx.args.json:
        ctx.json(info)
    else:
        ctx.print(info["address"])
        _print_list(ctx, info)
    return EXIT_OK


def cmd_list_remove(ctx: Context) -> int:
    from ..store import queries as q

    with ctx.store().write() as session:
        row = q.find_list(session, ctx.args.list)
        counts = q.list_counts(session, row)
        q.remove_list(session, ctx.args.list)
        address = row.posting_address
    ctx.print(f"removed list {address} ({counts['member']} members, "
              f"{counts['nonmember']} nonmembers, {counts['patterns']} patterns, "
              f"{counts['bans']} bans)")
    return EXIT_OK


def cmd_list_ls(ctx: Context) -> int:
    from ..store import queries as q

    with ctx.store().read() as session:
        infos = [_list_info(session, row) for row in q.all_lists(session)]
    if ctx.args.json:
        ctx.json(infos)
        return EXIT_OK
    for info in infos:
        flags = " EMERGENCY" if info["emergency"] else ""
        ctx.print(f"{info['address']}  {info['mode']}  members {info['counts']['member']}  "
                  f"member {info['default_member_action']}  "
                  f"nonmember {info['default_nonmember_action']}{flags}")
    return EXIT_OK


def _list_info(session, row, details: bool = False) -> dict:
    from ..store import queries as q

    info = {
        "address": row.posting_address,
        "list_id": row.list_id,
        "display_name": row.display_name,
        "mode": row.mode.value,
        "emergency": row.emergency,
        "default_member_action": row.default_member_action.label,
        "default_nonmember_action": row.default_nonmember_action.label,
        "rejection_notice": row.rejection_notice,
        "counts": q.list_counts(session, row),
        # The hash is never shown: only whether there is one.
        "moderator_password": "set" if row.moderator_password else None,
        "header_matches": row.header_matches,
        "max_message_size": row.max_message_size,
        "max_num_recipients": row.max_num_recipients,
        "require_explicit_destination": row.require_explicit_destination,
        "acceptable_aliases": row.acceptable_aliases,
        "administrivia": row.administrivia,
        "bounce_matching_headers": row.bounce_matching_headers,
        "newsgroup_moderated": row.newsgroup_moderated,
        "smtp_moderation": row.smtp_moderation,
        "dmarc_mitigate_action": DmarcAction(row.dmarc_mitigate_action).label,
        "dmarc_mitigate_unconditionally": row.dmarc_mitigate_unconditionally,
        "dmarc_addresses": row.dmarc_addresses,
        "dmarc_quarantine": row.dmarc_quarantine,
    }
    if details:
        groups: dict[str, list[str]] = {f"{k}_these_nonmembers": [] for k in KIND_NAMES}
        for kind, _, text in q.patterns(session, row):
            groups[f"{kind.label}_these_nonmembers"].append(text)
        info.update(groups)
        info["bans"] = q.bans(session, row)
    return info


def _print_list(ctx: Context, info: dict) -> None:
    rows = [
        ("list-id", info["list_id"]),
        ("display name", info["display_name"]),
        ("mode", info["mode"]),
        ("emergency", show_value(info["emergency"])),
        ("default member action", info["default_member_action"]),
        ("default nonmember action", info["default_nonmember_action"]),
        ("rejection notice", show_value(info["rejection_notice"])),
    ]
    if info.get("smtp_moderation", "off") != "off":
        rows.append(("smtp moderation", info["smtp_moderation"]))
    if info.get("dmarc_mitigate_action", "no_mitigation") != "no_mitigation":
        rows.append(("dmarc mitigate action", info["dmarc_mitigate_action"] + (
            " (unconditionally)" if info["dmarc_mitigate_unconditionally"] else "") + (
            " (p=quarantine not counted)" if info["mode"] == "mailman2"
            and not info.get("dmarc_quarantine", True) else "")))
    counts = info["counts"]
    rows.append(("subscribers", f"{counts['member']} members, {counts['nonmember']} "
                 f"nonmembers, {counts['owner']} owners, {counts['moderator']} moderators"))
    for kind in KIND_NAMES:
        key = f"{kind}_these_nonmembers"
        if info.get(key):
            rows.append((key, "  ".join(info[key])))
    if info.get("bans"):
        rows.append(("bans", "  ".join(info["bans"])))
    for label, value in rows:
        ctx.print(f"  {label + ':':<26}{value}")
