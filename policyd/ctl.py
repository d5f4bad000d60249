"""``policyctl``: the synchronous admin command line for the native store and the daemon.

Store commands (``init``, ``migrate``, ``domain``, ``list``, ``member``, ``nonmember``,
``user``, ``pattern``, ``ban``) run without a reactor, each in one transaction: a command
that fails writes nothing.  ``query`` asks the running daemon over its control socket, or
decides from the store itself with ``--offline``; ``status`` and ``reload`` talk to the
daemon.  Errors are mapped to messages and exit codes in one place, ``run()``:

    0 ok   2 bad input   3 daemon unreachable   4 not found   5 store unavailable
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, TextIO

from . import __version__
from . import config as config_module
from .errors import BadInput, DaemonUnreachable, NotFound, PolicydError, StoreUnavailable
from .core.verdict import Action, Mode

EXIT_OK = 0
EXIT_BAD_INPUT = BadInput.exit_code
EXIT_DAEMON = DaemonUnreachable.exit_code
EXIT_NOT_FOUND = NotFound.exit_code
EXIT_STORE = StoreUnavailable.exit_code

ACTION_NAMES = tuple(a.label for a in Action)
ROLE_NAMES = ("member", "owner", "moderator", "nonmember")
KIND_NAMES = ("accept", "hold", "reject", "discard")


class Context:
    """What a command needs: parsed arguments, output streams, config and store, each
    loaded on first use."""

    def __init__(self, args: argparse.Namespace, out: TextIO, err: TextIO,
                 environ: dict[str, str], stdin: TextIO) -> None:
        self.args = args
        self.out = out
        self.err = err
        self.environ = environ
        self.stdin = stdin
        self._config: config_module.Config | None = None
        self._store = None

    # --- configuration and store ---------------------------------------------------------

    def config(self) -> config_module.Config:
        if self._config is None:
            path = self.args.config or config_module.default_path(self.environ)
            if not self.args.config and self.args.store and not Path(path).exists():
                # Only a store URL given and no configuration installed: defaults.
                self._config = config_module.parse("", source="<defaults>")
            else:
                self._config = config_module.load(path)
        return self._config

    def store_config(self) -> config_module.StoreConfig:
        if self.args.store:
            return config_module.StoreConfig("native", self.args.store, 2.0)
        return self.config().store

    def store(self):
        if self._store is None:
            from .store import Store

            store_config = self.store_config()
            if store_config.backend != "native":
                raise BadInput(
                    f"{self.config().source}: [store] backend = {store_config.backend}; "
                    "policyctl writes only the native store (use Mailman's own tools for a "
                    "Mailman database, or --store URL for a native store)")
            self._store = Store(store_config.url)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    # --- output --------------------------------------------------------------------------

    def print(self, *parts, **kwargs) -> None:
        print(*parts, file=self.out, **kwargs)

    def warn(self, text: str) -> None:
        print(f"policyctl: warning: {text}", file=self.err)

    def json(self, value) -> None:
        json.dump(value, self.out, indent=2, sort_keys=False, default=str)
        self.out.write("\n")

    def lines(self, path: str) -> Iterable[str]:
        if path == "-":
            return self.stdin.read().splitlines()
        try:
            return Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise BadInput(f"cannot read {path}: {error.strerror}") from None
        except UnicodeDecodeError:
            raise BadInput(f"cannot read {path}: not UTF-8 text") from None


# --- argument types ----------------------------------------------------------------------


def _action(text: str) -> Action:
    try:
        return Action.from_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _action_or_default(text: str) -> Action | None:
    if text.strip().lower() == "default":
        return None
    return _action(text)


def _on_off(text: str) -> bool:
    value = text.strip().lower()
    if value in ("on", "yes", "true", "1"):
        return True
    if value in ("off", "no", "false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} (allowed: on, off)")


def _position(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} (allowed: 1, 2, ...)")
    return value


# --- init and migrate --------------------------------------------------------------------


def cmd_init(ctx: Context) -> int:
    from . import demo

    store = ctx.store()
    before, after = store.upgrade()
    _report_schema(ctx, store, before, after)
    if ctx.args.demo:
        loaded = demo.ensure_demo(store)
        if loaded is None:
            ctx.print("demo data: not loaded, the store has lists already")
        else:
            ctx.print("demo data: loaded")
            for line in loaded:
                ctx.print(f"  {line}")
    return EXIT_OK


def cmd_migrate(ctx: Context) -> int:
    from .store.engine import sqlite_path

    store = ctx.store()
    path = sqlite_path(store.engine)
    if path is not None and not path.exists():
        raise StoreUnavailable(f"no store at {path}; run `policyctl init`")
    before, after = store.upgrade()
    _report_schema(ctx, store, before, after)
    return EXIT_OK


def _report_schema(ctx: Context, store, before: str | None, after: str) -> None:
    if before is None:
        ctx.print(f"store {store.describe()}: created (schema rev {after})")
    elif before != after:
        ctx.print(f"store {store.describe()}: migrated from rev {before} to {after}")
    else:
        ctx.print(f"store {store.describe()}: up to date (schema rev {after})")


# --- domains -----------------------------------------------------------------------------


def cmd_domain_add(ctx: Context) -> int:
    from .store import queries as q

    with ctx.store().write() as session:
        domain = q.add_domain(session, ctx.args.name, ctx.args.alias_of)
        name = domain.name
    suffix = f" (alias of {q.parse_domain(ctx.args.alias_of)})" if ctx.args.alias_of else ""
    ctx.print(f"added domain {name}{suffix}")
    return EXIT_OK


def cmd_domain_remove(ctx: Context) -> int:
    from .store import queries as q

    with ctx.store().write() as session:
        aliases = q.remove_domain(session, ctx.args.name)
    ctx.print(f"removed domain {q.parse_domain(ctx.args.name)}"
              + (f" and its alias domains {', '.join(aliases)}" if aliases else ""))
    return EXIT_OK


def cmd_domain_list(ctx: Context) -> int:
    from .store import queries as q

    with ctx.store().read() as session:
        rows = q.domains(session)
    if ctx.args.json:
        ctx.json([{"domain": name, "alias_of": alias} for name, alias in rows])
        return EXIT_OK
    for name, alias in rows:
        ctx.print(f"{name} (alias of {alias})" if alias else name)
    return EXIT_OK


# --- lists -------------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> dict:
    changes = {}
    for key in ("display_name", "mode", "emergency", "default_member_action",
                "default_nonmember_action", "rejection_notice"):
        value = getattr(args, key, None)
        if value is not None:
            changes[key] = Mode(value) if key == "mode" else value
    return changes


def cmd_list_add(ctx: Context) -> int:
    from .store import queries as q

    settings = _settings(ctx.args)
    with ctx.store().write() as session:
        row, created = q.add_list(session, ctx.args.list, list_id=ctx.args.list_id, **settings)
        info = _list_info(session, row)
    if created:
        ctx.print(f"added domain {info['address'].split('@', 1)[1]}")
    ctx.print(f"added list {info['address']}")
    _print_list(ctx, info)
    return EXIT_OK


def cmd_list_set(ctx: Context) -> int:
    from .store import queries as q

    changes = _settings(ctx.args)
    if not changes:
        raise BadInput("nothing to change: give one or more of --display-name, --mode, "
                       "--emergency, --default-member-action, --default-nonmember-action, "
                       "--rejection-notice")
    with ctx.store().write() as session:
        row = q.set_list(session, ctx.args.list, **changes)
        info = _list_info(session, row)
    ctx.print(f"changed {info['address']}: " + ", ".join(
        f"{key.replace('_', ' ')} = {_show_value(info[key])}" for key in changes))
    return EXIT_OK


def cmd_list_show(ctx: Context) -> int:
    from .store import queries as q

    with ctx.store().read() as session:
        info = _list_info(session, q.find_list(session, ctx.args.list), details=True)
    if ctx.args.json:
        ctx.json(info)
    else:
        ctx.print(info["address"])
        _print_list(ctx, info)
    return EXIT_OK


def cmd_list_remove(ctx: Context) -> int:
    from .store import queries as q

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
    from .store import queries as q

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
    from .store import queries as q

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
    }
    if details:
        groups: dict[str, list[str]] = {f"{k}_these_nonmembers": [] for k in KIND_NAMES}
        for kind, _, text in q.patterns(session, row):
            groups[f"{kind.label}_these_nonmembers"].append(text)
        info.update(groups)
        info["bans"] = q.bans(session, row)
    return info


def _show_value(value) -> str:
    if value is None or value == {} or value == []:
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _print_list(ctx: Context, info: dict) -> None:
    rows = [
        ("list-id", info["list_id"]),
        ("display name", info["display_name"]),
        ("mode", info["mode"]),
        ("emergency", _show_value(info["emergency"])),
        ("default member action", info["default_member_action"]),
        ("default nonmember action", info["default_nonmember_action"]),
        ("rejection notice", _show_value(info["rejection_notice"])),
    ]
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


# --- members and nonmembers --------------------------------------------------------------


def _role(ctx: Context):
    from .store.models import MemberRole

    name = getattr(ctx.args, "role", None) or ctx.args.fixed_role
    return MemberRole.from_name(name)


def _entries(ctx: Context, default_action: Action | None, *, need_one: bool = True):
    """The addresses of a member command: arguments and/or ``--file`` lines."""
    from .store import queries as q

    entries = q.entries_from(ctx.args.addresses, default_action)
    if ctx.args.file:
        source = "stdin" if ctx.args.file == "-" else ctx.args.file
        entries += q.parse_entries(ctx.lines(ctx.args.file), default_action, source)
    if need_one and not entries:
        raise BadInput("no addresses given (arguments, or --file PATH|-)")
    return entries


def _summary(emails: list[str], limit: int = 5) -> str:
    shown = ", ".join(emails[:limit])
    return shown + (f" and {len(emails) - limit} more" if len(emails) > limit else "")


def _plural(count: int, word: str) -> str:
    if count == 1:
        return f"{count} {word}"
    return f"{count} {word}" + ("es" if word.endswith("s") else "s")


def cmd_member_add(ctx: Context) -> int:
    from .store import queries as q

    role = _role(ctx)
    user_name = getattr(ctx.args, "user", None)
    entries = _entries(ctx, ctx.args.action, need_one=user_name is None)
    with ctx.store().write() as session:
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
        address = mlist.posting_address
    if created_user:
        ctx.print(f"created user {user_name}")
    if user is not None and entries:
        ctx.print(f"linked to user {user_name}: {_summary([e.email for e in entries])}")
    how = f" (user {user_name}, through its preferred address)" if not entries else ""
    ctx.print(f"{address}: added {_plural(len(added), role.label)}{how}"
              + (f": {_summary(added)}" if 0 < len(added) <= 5 else ""))
    if existing:
        ctx.print(f"{address}: already {_plural(len(existing), role.label)}, left unchanged: "
                  f"{_summary(existing)}")
    return EXIT_OK


def cmd_member_remove(ctx: Context) -> int:
    from .store import queries as q

    role = _role(ctx)
    entries = _entries(ctx, None)
    with ctx.store().write() as session:
        mlist = q.find_list(session, ctx.args.list)
        count = q.remove_members(session, mlist, entries, role)
        address = mlist.posting_address
    ctx.print(f"{address}: removed {_plural(count, role.label)}")
    return EXIT_OK


def cmd_member_set(ctx: Context) -> int:
    from .store import queries as q

    role = _role(ctx)
    if ctx.args.action is _UNSET and not ctx.args.file:
        raise BadInput("give --action ACTION (or 'default'), or --file lines with actions")
    default = None if ctx.args.action is _UNSET else ctx.args.action
    entries = _entries(ctx, default)
    with ctx.store().write() as session:
        mlist = q.find_list(session, ctx.args.list)
        count = q.set_members(session, mlist, entries, role)
        address = mlist.posting_address
    actions = sorted({q.action_label(e.action) for e in entries})
    ctx.print(f"{address}: set the action of {_plural(count, role.label)} to "
              f"{', '.join(actions)}")
    return EXIT_OK


def cmd_member_ls(ctx: Context) -> int:
    from .store import queries as q

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


# --- users -------------------------------------------------------------------------------


def cmd_user_add(ctx: Context) -> int:
    from .store import queries as q

    entries = q.entries_from(ctx.args.addresses, None)
    with ctx.store().write() as session:
        user = q.add_user(session, ctx.args.name, entries, ctx.args.display_name)
        info = q.user_info(session, user)
    ctx.print(f"added user {info['name']}"
              + (f" with {', '.join(info['addresses'])}" if info["addresses"] else ""))
    return EXIT_OK


def cmd_user_link(ctx: Context) -> int:
    from .store import queries as q

    entries = q.entries_from(ctx.args.addresses, None)
    with ctx.store().write() as session:
        user = q.find_user(session, ctx.args.name)
        linked = q.link_addresses(session, user, entries)
    ctx.print(f"user {ctx.args.name}: linked {_plural(len(linked), 'address')}"
              + (f": {_summary(linked)}" if linked else " (all were linked already)"))
    return EXIT_OK


def cmd_user_unlink(ctx: Context) -> int:
    from .store import queries as q

    emails = [e.email for e in q.entries_from(ctx.args.addresses, None)]
    with ctx.store().write() as session:
        q.unlink_addresses(session, emails)
    ctx.print(f"unlinked {_summary(emails)}")
    return EXIT_OK


def cmd_user_prefer(ctx: Context) -> int:
    from .store import queries as q

    email, _ = q.parse_address(ctx.args.address)
    with ctx.store().write() as session:
        user = q.find_user(session, ctx.args.name)
        q.set_preferred(session, user, email)
    ctx.print(f"user {ctx.args.name}: preferred address {email}")
    return EXIT_OK


def cmd_user_show(ctx: Context) -> int:
    from .store import queries as q

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
    from .store import queries as q

    with ctx.store().read() as session:
        rows = q.all_users(session)
    if ctx.args.json:
        ctx.json([{"name": name, "addresses": count} for name, count in rows])
        return EXIT_OK
    for name, count in rows:
        ctx.print(f"{name}  {_plural(count, 'address')}")
    return EXIT_OK


def cmd_user_remove(ctx: Context) -> int:
    from .store import queries as q

    with ctx.store().write() as session:
        q.remove_user(session, ctx.args.name)
    ctx.print(f"removed user {ctx.args.name} (its addresses and direct memberships stay)")
    return EXIT_OK


# --- patterns ----------------------------------------------------------------------------


def cmd_pattern_add(ctx: Context) -> int:
    from .store import queries as q

    kind = q.parse_kind(ctx.args.kind)
    with ctx.store().write() as session:
        mlist = q.find_list(session, ctx.args.list)
        text = q.check_pattern(ctx.args.pattern)
        position = q.add_pattern(session, mlist, kind, ctx.args.pattern, ctx.args.position)
        address, mode = mlist.posting_address, mlist.mode
    ctx.print(f"{address}: {kind.label}_these_nonmembers #{position}: {text}")
    if text.startswith("@") and kind is not Action.ACCEPT and mode is Mode.MAILMAN3:
        ctx.warn(f"Mailman 3 reads @list entries only in accept_these_nonmembers; "
                 f"{text} has no effect in {kind.label}_these_nonmembers of a mailman3 list")
    return EXIT_OK


def cmd_pattern_remove(ctx: Context) -> int:
    from .store import queries as q

    kind = q.parse_kind(ctx.args.kind)
    with ctx.store().write() as session:
        mlist = q.find_list(session, ctx.args.list)
        q.remove_pattern(session, mlist, kind, ctx.args.pattern)
        address = mlist.posting_address
    ctx.print(f"{address}: removed {ctx.args.pattern.strip()} from "
              f"{kind.label}_these_nonmembers")
    return EXIT_OK


def cmd_pattern_list(ctx: Context) -> int:
    from .store import queries as q

    kind = q.parse_kind(ctx.args.kind) if ctx.args.kind else None
    with ctx.store().read() as session:
        mlist = q.find_list(session, ctx.args.list)
        rows = q.patterns(session, mlist, kind)
    if ctx.args.json:
        ctx.json([{"kind": k.label, "position": p, "pattern": t} for k, p, t in rows])
        return EXIT_OK
    for k, position, text in rows:
        ctx.print(f"{k.label:<8} {position:>3}  {text}")
    return EXIT_OK


# --- bans --------------------------------------------------------------------------------


def _ban_scope(ctx: Context, *, patterns_required: bool = True):
    """(list reference or None for --site, patterns) from ``[LIST] PATTERN...``."""
    items = list(ctx.args.items)
    if ctx.args.site:
        target = None
    else:
        if not items:
            raise BadInput("give a LIST, or --site for site-wide bans")
        target = items.pop(0)
    if patterns_required and not items:
        raise BadInput("give one or more addresses or ^regex patterns")
    return target, items


def _ban_list(session, target):
    from .store import queries as q

    return None if target is None else q.find_list(session, target)


def cmd_ban_add(ctx: Context) -> int:
    from .store import queries as q

    target, items = _ban_scope(ctx)
    with ctx.store().write() as session:
        mlist = _ban_list(session, target)
        added = [q.add_ban(session, mlist, item) for item in items]
        where = "site-wide" if mlist is None else f"on {mlist.posting_address}"
    ctx.print(f"banned {where}: {', '.join(added)}")
    return EXIT_OK


def cmd_ban_remove(ctx: Context) -> int:
    from .store import queries as q

    target, items = _ban_scope(ctx)
    with ctx.store().write() as session:
        mlist = _ban_list(session, target)
        for item in items:
            q.remove_ban(session, mlist, item)
        where = "site-wide" if mlist is None else f"on {mlist.posting_address}"
    ctx.print(f"unbanned {where}: {', '.join(i.strip() for i in items)}")
    return EXIT_OK


def cmd_ban_list(ctx: Context) -> int:
    from .store import queries as q

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


# --- query, status, reload ---------------------------------------------------------------


def _control_client():
    try:
        from . import control_client
    except ImportError:
        raise DaemonUnreachable("this policyd has no control client; "
                                "use --offline to decide from the store") from None
    return control_client


def _control_socket(ctx: Context) -> Path:
    return ctx.config().daemon.control_socket


def cmd_query(ctx: Context) -> int:
    args = ctx.args
    sender = "" if args.sender_address.strip() in ("", "<>") else args.sender_address
    if args.offline:
        result = offline_query(ctx, args.list, sender, args.from_header, args.reply_to_header,
                               args.sender_header)
    else:
        client = _control_client()
        try:
            result = client.query(_control_socket(ctx), args.list, sender, args.from_header,
                                  args.reply_to_header, args.sender_header,
                                  timeout=args.timeout)
        except client.ControlError as error:
            raise DaemonUnreachable(f"{error} (use --offline to decide from the store "
                                    "without the daemon)") from None
    if args.json:
        ctx.json(result)
    else:
        print_result(ctx, result, explain=args.explain)
    return EXIT_OK


def offline_query(ctx: Context, recipient: str, sender: str, from_header: str | None,
                  reply_to_header: str | None, sender_header: str | None) -> dict:
    """Decide from the store in this process: the same dict the daemon answers."""
    from .core.chain import decide
    from .store import open_backend
    from .core.verdict import Query

    config = ctx.config()
    backend = open_backend(ctx.store_config())
    try:
        backend.check()
        snapshot = backend.load_snapshot()
    finally:
        backend.close()
    query = Query(recipient, sender, from_header, reply_to_header, sender_header)
    try:
        from . import wire
    except ImportError:
        wire = None
    if wire is not None and hasattr(wire, "query_result"):
        return wire.query_result(snapshot, query, config.smtp,
                                 postfix_mode=config.postfix.mode,
                                 accept_action=config.postfix.accept_action, decide=decide)
    decision = decide(snapshot, query)
    reply = config.smtp.reply(decision)
    return {
        "decision": decision.to_dict(),
        "reply": {"outcome": reply.outcome.value, "code": reply.code, "status": reply.status,
                  "text": reply.text},
        "snapshot": {"version": snapshot.version,
                     "age": round(max(0.0, time.time() - snapshot.built_at), 3)},
    }


def print_result(ctx: Context, result: dict, *, explain: bool = False) -> None:
    decision = result["decision"]
    reply = result["reply"]
    rows = [
        ("verdict", decision["verdict"]),
        ("reply", f"{reply['code']} {reply['status']} {reply['text']}  "
                  f"(MTA outcome {reply['outcome']})"),
        ("rule", decision["rule"]),
        ("reason", decision["reason"]),
        ("sender", decision.get("sender") or "-"),
    ]
    if decision.get("action"):
        rows.append(("action", decision["action"]))
    if "exim" in result:
        rows.append(("exim", result["exim"]))
    if "postfix" in result:
        rows.append(("postfix", f"action={result['postfix']}"))
    snapshot = result.get("snapshot") or {}
    if snapshot:
        rows.append(("snapshot", f"version {snapshot.get('version')}, "
                                 f"age {float(snapshot.get('age') or 0):.1f} s"))
    for label, value in rows:
        ctx.print(f"{label + ':':<10}{value}")
    if explain:
        ctx.print("senders:  " + (", ".join(decision.get("senders") or ()) or "-"))
        ctx.print("trace:")
        for step in decision.get("trace", ()):
            mark = "HIT " if step["hit"] else "miss"
            ctx.print(f"  {mark}  {step['rule']:<22} {step['detail']}")


def cmd_status(ctx: Context) -> int:
    if ctx.args.offline:
        return _store_status(ctx)
    client = _control_client()
    try:
        result = client.status(_control_socket(ctx), timeout=ctx.args.timeout)
    except client.ControlError as error:
        raise DaemonUnreachable(f"{error} (use `policyctl status --offline` for the store "
                                "alone)") from None
    if ctx.args.json:
        ctx.json(result)
    else:
        _print_mapping(ctx, result)
    return EXIT_OK


def _store_status(ctx: Context) -> int:
    from .store import open_backend

    store_config = ctx.store_config()
    backend = open_backend(store_config)
    try:
        backend.check()
        info = {"store": backend.describe(), "change_token": backend.change_token()}
    finally:
        backend.close()
    if store_config.backend == "native":
        from .store import queries as q

        with ctx.store().read() as session:
            info.update(q.totals(session))
    if ctx.args.json:
        ctx.json(info)
    else:
        _print_mapping(ctx, info)
    return EXIT_OK


def _print_mapping(ctx: Context, value, indent: str = "") -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                ctx.print(f"{indent}{key}:")
                _print_mapping(ctx, item, indent + "  ")
            else:
                ctx.print(f"{indent}{key}: {_show_value(item)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and item:
                # "- first: value" then the other keys aligned under it.
                first, *rest = item.items()
                ctx.print(f"{indent}- {first[0]}: {_show_value(first[1])}")
                _print_mapping(ctx, dict(rest), indent + "  ")
            elif isinstance(item, list):
                _print_mapping(ctx, item, indent + "  ")
            else:
                ctx.print(f"{indent}- {_show_value(item)}")
    else:
        ctx.print(f"{indent}{value}")


def cmd_reload(ctx: Context) -> int:
    client = _control_client()
    try:
        result = client.reload(_control_socket(ctx), timeout=ctx.args.timeout)
    except client.ControlError as error:
        raise DaemonUnreachable(str(error)) from None
    if ctx.args.json:
        ctx.json(result)
    else:
        _print_mapping(ctx, result if result is not None else "reloaded")
    return EXIT_OK


# --- the parser --------------------------------------------------------------------------

_UNSET = object()


class _Parser(argparse.ArgumentParser):
    """Usage errors are bad input: exit code 2 (argparse's own choice too)."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="policyctl",
        description="Manage policyd's native store and ask the daemon about posting decisions.",
        epilog="exit codes: 0 ok, 2 bad input, 3 daemon unreachable, 4 not found, "
               "5 store unavailable",
    )
    parser.add_argument("--version", action="version", version=f"policyctl {__version__}")
    parser.add_argument("--config", metavar="PATH",
                        help="configuration file (default: $POLICYD_CONFIG or "
                             "/etc/policyd/policyd.conf)")
    parser.add_argument("--store", metavar="URL",
                        help="native store URL, overriding [store] url (e.g. "
                             "sqlite:////var/lib/policyd/policyd.sqlite)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(sub, name, handler: Callable, help_text: str, aliases=()):
        p = sub.add_parser(name, help=help_text, description=help_text, aliases=list(aliases))
        p.set_defaults(handler=handler)
        return p

    def group(name, help_text):
        p = commands.add_parser(name, help=help_text, description=help_text)
        sub = p.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
        p.set_defaults(handler=None, group_parser=p)
        return sub

    def json_flag(p):
        p.add_argument("--json", action="store_true", help="print JSON")

    p = command(commands, "init", cmd_init, "create the store or migrate it to this version")
    p.add_argument("--demo", action="store_true",
                   help="load the demo dataset if the store has no lists")
    command(commands, "migrate", cmd_migrate, "migrate an existing store's schema")

    sub = group("domain", "mail hosts and alias domains")
    p = command(sub, "add", cmd_domain_add, "add a mail host, or an alias domain")
    p.add_argument("name")
    p.add_argument("--alias-of", metavar="HOST",
                   help="make NAME an alias domain of the mail host HOST")
    p = command(sub, "remove", cmd_domain_remove, "remove a domain (and its alias domains)")
    p.add_argument("name")
    p = command(sub, "list", cmd_domain_list, "list domains", aliases=["ls"])
    json_flag(p)

    def list_settings(p, creating: bool):
        p.add_argument("--display-name", metavar="TEXT")
        p.add_argument("--mode", choices=[m.value for m in Mode],
                       help="whose moderation semantics (default mailman3)" if creating
                       else "whose moderation semantics")
        p.add_argument("--emergency", type=_on_off, metavar="on|off")
        p.add_argument("--default-member-action", type=_action, metavar="ACTION",
                       help=f"{'|'.join(ACTION_NAMES)}" + (" (default defer)" if creating else ""))
        p.add_argument("--default-nonmember-action", type=_action, metavar="ACTION",
                       help=f"{'|'.join(ACTION_NAMES)}" + (" (default hold)" if creating else ""))
        p.add_argument("--rejection-notice", metavar="TEXT",
                       help="the SMTP text of a rejection ('' clears it)")

    sub = group("list", "mailing lists and their settings")
    p = command(sub, "add", cmd_list_add, "create a list (and its domain if new)")
    p.add_argument("list", metavar="ADDRESS", help="posting address, e.g. discuss@lists.example.org")
    p.add_argument("--list-id", metavar="ID", help="default: name.mail.host")
    list_settings(p, True)
    p = command(sub, "set", cmd_list_set, "change a list's settings")
    p.add_argument("list", metavar="LIST")
    list_settings(p, False)
    p = command(sub, "show", cmd_list_show, "show a list's settings, patterns and bans")
    p.add_argument("list", metavar="LIST")
    json_flag(p)
    p = command(sub, "remove", cmd_list_remove,
                "remove a list with its memberships, patterns and bans")
    p.add_argument("list", metavar="LIST")
    p = command(sub, "ls", cmd_list_ls, "list the lists", aliases=["list"])
    json_flag(p)

    for noun, fixed in (("member", None), ("nonmember", "nonmember")):
        word = noun + "s"
        sub = group(noun, f"{word} of a list" + (" (and owners, moderators with --role)"
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
        p.add_argument("--action", type=_action_or_default, default=None, metavar="ACTION",
                       help=f"moderation action: {'|'.join(ACTION_NAMES)}|default "
                            "(default: the list default)")
        if fixed is None:
            p.add_argument("--user", metavar="NAME",
                           help="link the addresses to this user (created if new); without "
                                "addresses, subscribe the user through its preferred address")
        p = command(sub, "remove", cmd_member_remove, f"remove {word}")
        addresses(p)
        p = command(sub, "set", cmd_member_set, f"set the moderation action of {word}")
        addresses(p)
        p.add_argument("--action", type=_action_or_default, default=_UNSET, metavar="ACTION",
                       help=f"{'|'.join(ACTION_NAMES)}|default")
        p = command(sub, "ls", cmd_member_ls, f"list {word}", aliases=["list"])
        p.add_argument("list", metavar="LIST")
        if fixed is None:
            p.add_argument("--role", choices=ROLE_NAMES, default=None)
        p.set_defaults(fixed_role=fixed or "member")
        json_flag(p)

    sub = group("user", "users: one person's several addresses")
    p = command(sub, "add", cmd_user_add, "create a user (first address is preferred)")
    p.add_argument("name")
    p.add_argument("addresses", nargs="*", metavar="ADDRESS")
    p.add_argument("--display-name", metavar="TEXT")
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

    sub = group("pattern", "accept/hold/reject/discard_these_nonmembers")
    p = command(sub, "add", cmd_pattern_add, "add an address, ^regex or @list entry")
    p.add_argument("list", metavar="LIST")
    p.add_argument("kind", choices=KIND_NAMES)
    p.add_argument("pattern")
    p.add_argument("--position", type=_position, metavar="N", help="insert at N (1 = first)")
    p = command(sub, "remove", cmd_pattern_remove, "remove an entry")
    p.add_argument("list", metavar="LIST")
    p.add_argument("kind", choices=KIND_NAMES)
    p.add_argument("pattern")
    p = command(sub, "list", cmd_pattern_list, "list entries in order", aliases=["ls"])
    p.add_argument("list", metavar="LIST")
    p.add_argument("kind", nargs="?", choices=KIND_NAMES)
    json_flag(p)

    sub = group("ban", "banned addresses and ^regex patterns, per list or site-wide")
    for name, handler, text in (("add", cmd_ban_add, "ban addresses or patterns"),
                                ("remove", cmd_ban_remove, "lift bans")):
        p = command(sub, name, handler, text)
        p.add_argument("items", nargs="*", metavar="LIST PATTERN",
                       help="a LIST then one or more patterns; with --site only patterns")
        p.add_argument("--site", action="store_true", help="site-wide bans")
    p = command(sub, "list", cmd_ban_list, "list bans (all, one LIST, or --site)",
                aliases=["ls"])
    p.add_argument("items", nargs="*", metavar="LIST")
    p.add_argument("--site", action="store_true")
    json_flag(p)

    p = command(commands, "query", cmd_query,
                "what would policyd answer for a post from SENDER to LIST?")
    p.add_argument("list", metavar="LIST", help="the recipient address as the MTA sees it")
    p.add_argument("sender_address", metavar="SENDER",
                   help="envelope sender ('' or '<>' for the null sender)")
    p.add_argument("--from", dest="from_header", metavar="HDR", help="raw From: header value")
    p.add_argument("--reply-to", dest="reply_to_header", metavar="HDR",
                   help="raw Reply-To: header value")
    p.add_argument("--sender", dest="sender_header", metavar="HDR",
                   help="raw Sender: header value")
    p.add_argument("--explain", action="store_true", help="print the rule trace")
    p.add_argument("--offline", action="store_true",
                   help="decide from the store in this process, without the daemon")
    p.add_argument("--timeout", type=float, default=5.0, help=argparse.SUPPRESS)
    json_flag(p)

    p = command(commands, "status", cmd_status, "the daemon's status (--offline: the store's)")
    p.add_argument("--offline", action="store_true", help="the store alone, without the daemon")
    p.add_argument("--timeout", type=float, default=5.0, help=argparse.SUPPRESS)
    json_flag(p)
    p = command(commands, "reload", cmd_reload, "make the daemon reload its snapshot now")
    p.add_argument("--timeout", type=float, default=5.0, help=argparse.SUPPRESS)
    json_flag(p)
    from .store import mailman2

    mailman2.register(commands)
    return parser


# --- entry points ------------------------------------------------------------------------


def run(args: argparse.Namespace, out: TextIO, err: TextIO, environ=None,
        stdin: TextIO | None = None) -> int:
    """Run one parsed command; the one place errors become messages and exit codes."""
    ctx = Context(args, out, err, dict(os.environ if environ is None else environ),
                  stdin or sys.stdin)
    try:
        return args.handler(ctx)
    except PolicydError as error:
        _error(err, str(error))
        return error.exit_code
    except config_module.ConfigError as error:
        _error(err, str(error))
        return EXIT_BAD_INPUT
    except ValueError as error:
        # Validation in the vocabulary (Action.from_name, MemberRole.from_name, Mode).
        _error(err, str(error))
        return EXIT_BAD_INPUT
    finally:
        ctx.close()


def _error(err: TextIO, message: str) -> None:
    lines = message.splitlines() or ["error"]
    print(f"policyctl: error: {lines[0]}", file=err)
    for line in lines[1:]:
        print(f"  {line}", file=err)


def main(argv: list[str] | None = None, *, out: TextIO | None = None,
         err: TextIO | None = None, environ=None, stdin: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_BAD_INPUT
    if getattr(args, "handler", None) is None:
        (getattr(args, "group_parser", None) or parser).print_help(err)
        return EXIT_BAD_INPUT
    try:
        return run(args, out, err, environ, stdin)
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
