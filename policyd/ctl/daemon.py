"""``policyctl query``, ``status`` and ``reload``: what the running daemon says, through
its control socket (``policyd.control_client``), or with ``--offline`` what the store
says in this process.

For people, times are ISO 8601 in local time with the UTC offset and durations are in
human units (``3 min 12 s``); ``--json`` prints the daemon's numbers as they are (epoch
seconds, seconds).
"""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path

from .. import control_client
from ..errors import BadInput, DaemonUnreachable, StoreUnavailable, Unavailable
from .arguments import command, json_flag, timeout_flag
from .output import EXIT_OK, Context, print_mapping


def register(commands) -> None:
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
    p.add_argument("--client", metavar="ADDR",
                   help="the SMTP client's IP address, for SMTP-time moderation's network "
                        "(default: a client whose network has no greylist entry)")
    p.add_argument("--message-id", dest="message_id", metavar="ID", type=message_id,
                   help="the post's Message-ID: header value, angle brackets included, "
                        "for SMTP-time moderation of the exim line (Exim's DATA-time "
                        "greylist entries and tickets are the post's; default: a post "
                        "without one); needs --from, --reply-to or --sender")
    p.add_argument("--explain", action="store_true", help="print the rule trace")
    p.add_argument("--offline", action="store_true",
                   help="decide from the store in this process, without the daemon")
    timeout_flag(p)
    json_flag(p)

    p = command(commands, "status", cmd_status, "the daemon's status (--offline: the store's)")
    p.add_argument("--offline", action="store_true", help="the store alone, without the daemon")
    timeout_flag(p)
    json_flag(p)
    p = command(commands, "reload", cmd_reload, "make the daemon reload its snapshot now")
    timeout_flag(p)
    json_flag(p)


def _control_socket(ctx: Context) -> Path:
    return ctx.config().daemon.control_socket


# --- query ---------------------------------------------------------------------------------


def message_id(text: str) -> str | None:
    """A Message-ID: header value as the control socket takes it (``MAX_MESSAGE_ID``);
    empty is none."""
    from ..protocols.control import MAX_MESSAGE_ID

    if len(text) > MAX_MESSAGE_ID:
        raise argparse.ArgumentTypeError(f"longer than {MAX_MESSAGE_ID} characters")
    return text.strip() or None


def cmd_query(ctx: Context) -> int:
    args = ctx.args
    sender = "" if args.sender_address.strip() in ("", "<>") else args.sender_address
    if args.message_id and (args.from_header, args.reply_to_header,
                            args.sender_header) == (None, None, None):
        # Without headers the exim line is Exim's RCPT-time question, which SMTP-time
        # moderation never answers: the Message-ID would silently mean nothing.
        raise BadInput("--message-id needs --from, --reply-to or --sender: the question "
                       "with headers is Exim's DATA-time one, the only one SMTP-time "
                       "moderation answers")
    checked = checked_query(args, sender)
    if args.offline:
        result = offline_query(ctx, checked.query)
    else:
        try:
            result = control_client.query(_control_socket(ctx), args.list, sender,
                                          args.from_header, args.reply_to_header,
                                          args.sender_header, timeout=args.timeout,
                                          client_address=args.client,
                                          message_id=args.message_id)
        except control_client.DaemonError as error:
            # The daemon is there and cannot decide (no snapshot, an empty store): what
            # the MTAs get meanwhile is the temporary failure.
            raise Unavailable(f"{error} (the MTAs get the temporary failure meanwhile; "
                              "--offline decides from the store without the "
                              "daemon)") from None
        except control_client.ControlError as error:
            raise DaemonUnreachable(f"{error} (use --offline to decide from the store "
                                    "without the daemon)") from None
    if args.json:
        ctx.json(result)
    else:
        print_result(ctx, result, explain=args.explain)
    return EXIT_OK


# What each field of the control socket's query is on policyctl's command line.
_OPTIONS = {"recipient": "LIST", "envelope_sender": "SENDER", "from_header": "--from",
            "reply_to_header": "--reply-to", "sender_header": "--sender",
            "client_address": "--client", "message_id": "--message-id"}


def checked_query(args: argparse.Namespace, sender: str):
    """The query as the daemon's control socket reads it (its line, ``MAX_LINE`` and
    ``parse_request``'s field limits): ``--offline`` decides only what the daemon would,
    and a field longer than an MTA can send is bad input with or without the daemon.
    Returns the ``ControlRequest``."""
    from ..protocols import ProtocolError
    from ..protocols.control import MAX_LINE, parse_request

    line = control_client.encode(control_client.query_message(
        args.list, sender, args.from_header, args.reply_to_header, args.sender_header,
        args.client, args.message_id))
    if len(line) - 1 > MAX_LINE:
        raise BadInput(f"the query is longer than the control socket's {MAX_LINE}-byte "
                       "line as policyctl writes it (JSON, non-ASCII escaped); policyd "
                       "refuses it")
    try:
        return parse_request(line)
    except ProtocolError as error:
        option = next((option for key, option in _OPTIONS.items()
                       if error.reason.startswith(key + " ")), None)
        raise BadInput((f"{option}: " if option else "") + f"{error.reason}; policyd's "
                       "control socket refuses it") from None


def offline_query(ctx: Context, query) -> dict:
    """Decide ``query`` (a ``Query``) from the store in this process: the same dict the
    daemon answers."""
    from ..core.chain import decide
    from ..decider import Decider, FixedSnapshot
    from ..protocols.control import query_result
    from ..store import open_backend

    config = ctx.config()
    backend = open_backend(ctx.store_config())
    try:
        backend.check()
        snapshot = backend.load_snapshot()
    finally:
        backend.close()
    decider = Decider(FixedSnapshot(snapshot), config.smtp, decide=decide,
                      fail_closed=config.daemon.fail_closed,
                      null_sender=config.rules.null_sender,
                      roles=config.rules.role_addresses)
    try:
        return query_result(decider, query, postfix_mode=config.postfix.mode,
                            accept_action=config.postfix.accept_action)
    except Unavailable as error:
        # The daemon would answer the MTAs its temporary failure (an empty store).
        raise StoreUnavailable(str(error)) from None


def _moderation_text(moderation: dict) -> str:
    """``greylist (applies): remembered; 1 entry waiting; ticket K7Q2M9 pending``."""
    parts = []
    if moderation.get("remembered_until"):
        parts.append("sender remembered")
    for entry in moderation.get("greylist", ()):
        parts.append(f"greylist entry {entry['network'] or '-'} {entry['state']} "
                     f"({entry['attempts']} attempts)")
    more = moderation.get("greylist_total", 0) - len(moderation.get("greylist", ()))
    if more > 0:
        parts.append(f"{more} more greylist entries")
    for ticket in moderation.get("tickets", ()):
        parts.append(f"ticket {ticket['ticket']} {ticket['decision']} "
                     f"({ticket['attempts']} attempts)")
    more = moderation.get("tickets_total", 0) - len(moderation.get("tickets", ()))
    if more > 0:
        parts.append(f"{more} more tickets")
    if not moderation.get("usable", True):
        parts.append("state unavailable: normal outcome")
    head = moderation["mode"] + (" (applies)" if moderation.get("applies") else
                                 " (does not apply to this decision)")
    return head + (": " + "; ".join(parts) if parts else "")


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
    moderation = result.get("moderation") or {}
    if "exim" in result:
        previewed = moderation.get("exim")
        rows.append(("exim", result["exim"] + (
            f"  ({moderation.get('mode', 'moderation')}: {previewed['transition']}; "
            f"{previewed['note']})" if previewed else "")))
    previewed = moderation.get("postfix")
    if "postfix" in result:
        rows.append(("postfix", f"action={result['postfix']}" + (
            f"  (greylist: {previewed['transition']}; {previewed['note']})"
            if previewed else "")))
    if moderation and moderation.get("mode", "off") != "off":
        rows.append(("smtp mod", _moderation_text(moderation)))
    snapshot = result.get("snapshot") or {}
    if snapshot:
        rows.append(("snapshot", f"version {snapshot.get('version')}, "
                                 f"age {duration(float(snapshot.get('age') or 0))}"))
    for label, value in rows:
        ctx.print(f"{label + ':':<10}{value}")
    if explain:
        ctx.print("senders:  " + (", ".join(decision.get("senders") or ()) or "-"))
        ctx.print("trace:")
        for step in decision.get("trace", ()):
            mark = "HIT " if step["hit"] else "miss"
            ctx.print(f"  {mark}  {step['rule']:<22} {step['detail']}")


# --- status and reload ---------------------------------------------------------------------


def cmd_status(ctx: Context) -> int:
    if ctx.args.offline:
        return _store_status(ctx)
    try:
        result = control_client.status(_control_socket(ctx), timeout=ctx.args.timeout)
    except control_client.ControlError as error:
        raise DaemonUnreachable(f"{error} (use `policyctl status --offline` for the store "
                                "alone)") from None
    if ctx.args.json:
        ctx.json(result)
    else:
        print_mapping(ctx, for_people(result))
    return EXIT_OK


def _store_status(ctx: Context) -> int:
    from ..store import open_backend

    store_config = ctx.store_config()
    backend = open_backend(store_config)
    try:
        backend.check()
        info = {"store": backend.describe(), "change_token": backend.change_token()}
    finally:
        backend.close()
    if store_config.backend == "native":
        from ..store import queries as q

        with ctx.store().read() as session:
            info.update(q.totals(session))
    if ctx.args.json:
        ctx.json(info)
    else:
        print_mapping(ctx, for_people(info))
    return EXIT_OK


def cmd_reload(ctx: Context) -> int:
    """Exit 0 once the daemon loaded the store as it is now; 5 when it could not (it
    says why, and keeps serving its last snapshot) or is still at it after the timeout
    (a stuck store: ``status`` shows it)."""
    try:
        result = control_client.reload(_control_socket(ctx), timeout=ctx.args.timeout)
    except control_client.AnswerTimeout as error:
        raise StoreUnavailable(f"{error}: the reload is still running (a stuck store? "
                               "`policyctl status` shows the store's health)") from None
    except control_client.DaemonError as error:
        raise StoreUnavailable(str(error)) from None
    except control_client.ControlError as error:
        raise DaemonUnreachable(str(error)) from None
    if ctx.args.json:
        ctx.json(result)
    else:
        print_mapping(ctx, for_people(result) if result is not None else "reloaded")
    if isinstance(result, dict) and result.get("reloaded") is False:
        return StoreUnavailable.exit_code
    return EXIT_OK


# --- times for people ----------------------------------------------------------------------

# Keys whose numbers are durations in seconds: these names, and these suffixes.
_DURATIONS = frozenset({"age", "uptime", "duration", "max_stale"})
_DURATION_SUFFIXES = ("_age", "_for", "_interval", "_timeout", "_duration", "_seconds")


def for_people(value, key: str | None = None):
    """The daemon's answer with epoch times (keys ``*_at``) as ISO 8601 and durations
    (``age``, ``uptime``, ``*_age``, ``failing_for``, ``refresh_interval``, ...) in human
    units; everything else as it is."""
    if isinstance(value, dict):
        return {k: for_people(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [for_people(item) for item in value]
    if key is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if key.endswith("_at"):
        return iso_time(value)
    if key in _DURATIONS or key.endswith(_DURATION_SUFFIXES):
        return duration(value)
    return value


def iso_time(epoch: float) -> str:
    """``2026-11-24T10:12:56+01:00``: local time, to the second, with its UTC offset."""
    return datetime.fromtimestamp(epoch, timezone.utc).astimezone().isoformat(
        timespec="seconds")


def duration(seconds: float) -> str:
    """``0.4 s``, ``12 s``, ``3 min 12 s``, ``2 h 5 min``, ``3 d 4 h``."""
    seconds = max(0.0, float(seconds))
    if round(seconds, 1) < 10:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"
