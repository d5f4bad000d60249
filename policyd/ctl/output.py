"""What every ``policyctl`` command shares: the ``Context`` it runs in (its arguments,
the configuration and the store, each loaded on first use, and its output streams), the
output helpers, and ``run``: the one place errors become messages and exit codes.

    0 ok   2 bad input   3 daemon unreachable   4 not found   5 store unavailable

A handler returns ``EXIT_OK`` or raises a ``PolicydError``, whose class carries its exit
code (``policyd.errors``); it never prints an error itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, TextIO

from .. import config as config_module
from ..errors import AlreadyExists, BadInput, PolicydError

EXIT_OK = 0
EXIT_BAD_INPUT = BadInput.exit_code


class Unchanged(Exception):
    """Raised inside ``Context.write()``: there is nothing to write after all."""


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
            from ..store import Store

            store_config = self.store_config()
            if store_config.backend != "native":
                raise BadInput(
                    f"{self.config().source}: [store] backend = {store_config.backend}; "
                    "policyctl writes only the native store (use Mailman's own tools for a "
                    "Mailman database, or --store URL for a native store)")
            self._store = Store.from_config(store_config)
        return self._store

    @contextmanager
    def write(self):
        """The store's write transaction, which a command may end early with
        ``Unchanged`` (rolled back: the generation is not bumped, so the daemon does not
        rebuild its snapshot for nothing)."""
        try:
            with self.store().write() as session:
                yield session
        except Unchanged:
            pass

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    def left_as_it_is(self, error: AlreadyExists) -> int:
        """With ``--ignore-existing``: say what exists already and succeed; without it,
        the error (exit 2, and the command's transaction is rolled back)."""
        if not getattr(self.args, "ignore_existing", False):
            raise error
        self.print(f"{error}, left as it is")
        return EXIT_OK

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


# --- formatting ----------------------------------------------------------------------------


def show_value(value) -> str:
    if value is None or value == {} or value == []:
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def summary(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def plural(count: int, word: str) -> str:
    if count == 1:
        return f"{count} {word}"
    return f"{count} {word}" + ("es" if word.endswith("s") else "s")


def print_mapping(ctx: Context, value, indent: str = "") -> None:
    """A dict or list (a daemon's answer, a store's totals) as indented ``key: value``
    lines."""
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                ctx.print(f"{indent}{key}:")
                print_mapping(ctx, item, indent + "  ")
            else:
                ctx.print(f"{indent}{key}: {show_value(item)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and item:
                # "- first: value" then the other keys aligned under it.
                first, *rest = item.items()
                ctx.print(f"{indent}- {first[0]}: {show_value(first[1])}")
                print_mapping(ctx, dict(rest), indent + "  ")
            elif isinstance(item, list):
                print_mapping(ctx, item, indent + "  ")
            else:
                ctx.print(f"{indent}- {show_value(item)}")
    else:
        ctx.print(f"{indent}{value}")


# --- errors and exit codes -----------------------------------------------------------------


def run(args: argparse.Namespace, out: TextIO, err: TextIO, environ=None,
        stdin: TextIO | None = None) -> int:
    """Run one parsed command; the one place errors become messages and exit codes."""
    ctx = Context(args, out, err, dict(os.environ if environ is None else environ),
                  stdin or sys.stdin)
    try:
        return args.handler(ctx)
    except AlreadyExists as error:
        hint = ("\n(--ignore-existing leaves what exists as it is)"
                if hasattr(args, "ignore_existing") else "")
        error_message(err, str(error) + hint)
        return error.exit_code
    except PolicydError as error:
        error_message(err, str(error))
        return error.exit_code
    except config_module.ConfigError as error:
        error_message(err, str(error))
        return EXIT_BAD_INPUT
    except ValueError as error:
        # Validation in the vocabulary (Action.from_name, MemberRole.from_name, Mode).
        error_message(err, str(error))
        return EXIT_BAD_INPUT
    finally:
        ctx.close()


def error_message(err: TextIO, message: str) -> None:
    lines = message.splitlines() or ["error"]
    print(f"policyctl: error: {lines[0]}", file=err)
    for line in lines[1:]:
        print(f"  {line}", file=err)
