"""``policyctl init``, ``migrate`` and ``import-mailman2``: the store's schema, and
Mailman 2.1 lists brought into it (the import itself is ``policyd.store.mailman2``)."""

from __future__ import annotations

from pathlib import Path

from .arguments import command, seconds
from .output import EXIT_OK, Context

# /etc/cron.d syntax.  The user policyd (in group list) reads Mailman 2's config.pck files
# and writes the store; --quiet prints only news, which cron mails (docs/mailman2.md).
CRON_LINE = ("*/5 * * * *  policyd  policyctl --config /etc/policyd/policyd.conf "
             "import-mailman2 --quiet /var/lib/mailman")


def register(commands) -> None:
    p = command(commands, "init", cmd_init, "create the store or migrate it to this version")
    p.add_argument("--demo", action="store_true",
                   help="load the demo dataset if the store has no lists")
    command(commands, "migrate", cmd_migrate, "migrate an existing store's schema")


def register_import(commands) -> None:
    p = commands.add_parser(
        "import-mailman2",
        help="import or update Mailman 2.1 lists (lists/NAME/config.pck) into the store",
        description="Import or update Mailman 2.1 lists into the native store, in Mailman "
                    "2 mode.  PATH is Mailman 2's prefix (e.g. /var/lib/mailman), its "
                    "lists directory, or one list's directory.  Given a prefix or lists "
                    "directory, it also removes the lists it imported from there whose "
                    "directory is gone (rmlist); nothing when the lists directory cannot "
                    "be read or has no list.  Run it again (or use "
                    "--watch, or cron: " + CRON_LINE + ") to keep the store current.")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--watch", type=seconds, metavar="SECONDS",
                   help="keep running: re-import whenever a config.pck changes or a "
                        "list directory goes, polling every SECONDS")
    p.add_argument("--quiet", action="store_true",
                   help="print only changes and errors: nothing for a list that did not "
                        "change, a list's warnings only when it changed, and no notes "
                        "about lists left alone (so a cron job mails only news)")
    p.set_defaults(handler=cmd_import_mailman2)


# --- init and migrate ----------------------------------------------------------------------


def cmd_init(ctx: Context) -> int:
    from .. import demo

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
    from ..errors import StoreUnavailable
    from ..store.engine import sqlite_path

    store = ctx.store()
    path = sqlite_path(store.engine)
    if path is not None and not path.exists():
        raise StoreUnavailable(f"no store at {path}; run `policyctl init`")
    before, after = store.upgrade()
    _report_schema(ctx, store, before, after)
    repaired = store.repair_triggers()
    if repaired is not None:
        ctx.print(f"store {store.describe()}: change triggers made again ({repaired})")
    return EXIT_OK


def _report_schema(ctx: Context, store, before: str | None, after: str) -> None:
    if before is None:
        ctx.print(f"store {store.describe()}: created (schema rev {after})")
    elif before != after:
        ctx.print(f"store {store.describe()}: migrated from rev {before} to {after}")
    else:
        ctx.print(f"store {store.describe()}: up to date (schema rev {after})")


# --- import-mailman2 -----------------------------------------------------------------------


def cmd_import_mailman2(ctx: Context) -> int:
    from ..store import mailman2

    store = ctx.store()
    store.require_schema()
    failures_seen: list[str] = []
    quiet = ctx.args.quiet

    def show(result) -> None:
        for report in result.reports:
            # A list that did not change has the same warnings as on the last run:
            # --quiet says them when the list changes (or when it is first imported).
            if not (quiet and report.unchanged):
                for warning in report.warnings:
                    ctx.warn(warning)
                ctx.print(report.line())
        for failure in result.failures:
            ctx.warn(f"not imported: {failure}")
        # The same every run, and nothing to do for the import: news only without --quiet.
        if not quiet:
            for note in result.notes:
                ctx.print(note)
        failures_seen[:] = result.failures

    if ctx.args.watch:
        try:
            mailman2.watch(store, Path(ctx.args.path), ctx.args.watch, show)
        except KeyboardInterrupt:
            return EXIT_OK
        return EXIT_OK
    show(mailman2.import_path(store, Path(ctx.args.path)))
    if failures_seen:
        raise mailman2.ImportFailed(f"{len(failures_seen)} list(s) not imported (see the "
                                    "warnings above); the others were")
    return EXIT_OK
