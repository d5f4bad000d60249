"""Argument types, names and flags that several ``policyctl`` command groups share, and
the two helpers each group registers its subcommands with."""

from __future__ import annotations

import argparse
from typing import Callable

from ..core.verdict import Action

ACTION_NAMES = tuple(a.label for a in Action)
ROLE_NAMES = ("member", "owner", "moderator", "nonmember")
KIND_NAMES = ("accept", "hold", "reject", "discard")

# "--action not given" for ``member set``, where ``None`` means "the list default".
UNSET = object()


# --- registering subcommands ---------------------------------------------------------------


def command(sub, name: str, handler: Callable, help_text: str, aliases=()):
    p = sub.add_parser(name, help=help_text, description=help_text, aliases=list(aliases))
    p.set_defaults(handler=handler)
    return p


def group(commands, name: str, help_text: str):
    """A command group (``policyctl member ...``); alone, it prints its help."""
    p = commands.add_parser(name, help=help_text, description=help_text)
    sub = p.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    p.set_defaults(handler=None, group_parser=p)
    return sub


def json_flag(p) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def ignore_existing_flag(p, what: str) -> None:
    p.add_argument("--ignore-existing", action="store_true",
                   help=f"leave {what} that exist already as they are and exit 0 (without "
                        "it, adding anything that exists is an error, exit 2, and nothing "
                        "is written)")


def timeout_flag(p) -> None:
    p.add_argument("--timeout", type=seconds, default=5.0, help=argparse.SUPPRESS)



# --- argument types ------------------------------------------------------------------------


def action(text: str) -> Action:
    try:
        return Action.from_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def action_or_default(text: str) -> Action | None:
    if text.strip().lower() == "default":
        return None
    return action(text)


def on_off(text: str) -> bool:
    value = text.strip().lower()
    if value in ("on", "yes", "true", "1"):
        return True
    if value in ("off", "no", "false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} (allowed: on, off)")


def position(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} (allowed: 1, 2, ...)")
    return value


def seconds(text: str) -> float:
    """Seconds, more than 0 and at most a day (``inf`` or ``1e12`` overflowed the socket
    and timer calls with a traceback)."""
    try:
        value = float(text)
    except ValueError:
        value = 0
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError("a number of seconds greater than 0, at most "
                                         "86400")
    return value
