"""``policyctl``'s argument parser, assembled from the command groups, and ``main``."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from .. import __version__
from . import daemon, lists, members, moderation, patterns, store
from .output import EXIT_BAD_INPUT, EXIT_OK, run

# In the order ``policyctl --help`` lists them.
GROUPS = (store.register, lists.register, members.register, patterns.register,
          daemon.register, store.register_import, moderation.register)


def build_parser() -> argparse.ArgumentParser:
    # Usage errors are bad input: exit code 2 (argparse's own choice too).
    parser = argparse.ArgumentParser(
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
    for register in GROUPS:
        register(commands)
    return parser


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
