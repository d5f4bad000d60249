"""A ready-to-run demo: a state directory with a configuration and a small native store.

``python -m policyd.demo --state-dir DIR`` (what ``make run`` runs first):

* writes ``DIR/policyd.conf`` if it is missing, with absolute paths under ``DIR``;
* creates or migrates the store the configuration names;
* loads the demo dataset if the store has no lists yet.

Running it again changes nothing that exists: it is idempotent.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from . import config as config_module
from .errors import PolicydError
from .store import Store
from .store import queries as q
from .store.models import MailingList, MemberRole
from .core.verdict import Action

DOMAIN = "lists.example.org"
ANNOUNCE = f"announce@{DOMAIN}"
DISCUSS = f"discuss@{DOMAIN}"

CONFIG_TEMPLATE = """\
# policyd demo configuration, written by `python -m policyd.demo`.
[store]
backend = native
url = sqlite:///{state}/policyd.sqlite
refresh_interval = 2

[daemon]
state_dir = {state}
control_socket = {state}/control.sock
control_socket_mode = 0600

[exim]
listen = unix:{state_escaped}/exim.sock:mode=660{exim_tcp}

[postfix]
listen = unix:{state_escaped}/postfix.sock:mode=660{postfix_tcp}
"""
# Only with --tcp: any local user can connect to a TCP port.
EXIM_TCP = " tcp:10041:interface=127.0.0.1"
POSTFIX_TCP = " tcp:10040:interface=127.0.0.1"

# (query recipient, envelope sender, From: header) -> what the demo data should decide;
# printed as examples and checked by the tests.
EXAMPLES = (
    (DISCUSS, "alice@example.com", None, "accept"),
    (DISCUSS, "alice@home.example", None, "accept"),
    (DISCUSS, "dave@example.com", None, "hold"),
    (DISCUSS, "stranger@elsewhere.example", None, "hold"),
    (DISCUSS, "sales@partner.example", None, "accept"),
    (DISCUSS, "bulk@spam.example", None, "reject"),
    (DISCUSS, "troll@example.net", None, "discard"),
    (ANNOUNCE, "editor@example.com", None, "accept"),
    (ANNOUNCE, "press@partner.example", None, "accept"),
    (ANNOUNCE, "alice@example.com", None, "reject"),
    (f"nosuchlist@{DOMAIN}", "alice@example.com", None, "reject"),
    (f"discuss-request@{DOMAIN}", "stranger@elsewhere.example", None, "accept"),
    (DISCUSS, "bounce-handler@mailer.example", "Alice <alice@example.com>", "accept"),
)


def load_demo(session: Session) -> list[str]:
    """Create the demo dataset in an open write transaction; returns what it did."""
    done = []
    q.add_domain(session, DOMAIN)
    q.add_domain(session, "lists.example.net", alias_of=DOMAIN)
    done.append(f"domain {DOMAIN} (alias domain lists.example.net)")

    announce, _ = q.add_list(
        session, ANNOUNCE, display_name="Announcements",
        default_member_action=Action.ACCEPT, default_nonmember_action=Action.REJECT,
        rejection_notice=f"Only the editors may post to {ANNOUNCE}",
    )
    q.add_members(session, announce, q.entries_from(["editor@example.com"], None))
    q.add_members(session, announce, q.entries_from(["Press@Partner.example"], Action.ACCEPT),
                  role=MemberRole.NONMEMBER)
    q.add_members(session, announce, q.entries_from(["owner@example.com"], None),
                  role=MemberRole.OWNER)
    done.append(f"list {ANNOUNCE}: members post, nonmembers are rejected with a notice; "
                "member editor@example.com; nonmember press@partner.example accepted")

    discuss, _ = q.add_list(
        session, DISCUSS, display_name="Discussion",
        default_member_action=Action.ACCEPT, default_nonmember_action=Action.HOLD,
    )
    alice, _ = q.get_or_create_user(session, "alice")
    q.link_addresses(session, alice, q.entries_from(
        ["alice@example.com", "Alice@Home.example"], None))
    q.subscribe_user(session, discuss, alice)
    q.add_members(session, discuss, q.entries_from(
        ["bob@example.com", "carol@example.com", "editor@example.com"], None))
    q.add_members(session, discuss, q.entries_from(["dave@example.com"], Action.HOLD))
    q.add_pattern(session, discuss, Action.ACCEPT, r"^.*@partner\.example$")
    q.add_pattern(session, discuss, Action.REJECT, r"^.*@spam\.example$")
    q.add_ban(session, discuss, "troll@example.net")
    done.append(
        f"list {DISCUSS}: members post, nonmembers are held; user alice "
        "(alice@example.com, alice@home.example) subscribed; members bob, carol, editor; "
        r"dave@example.com moderated (hold); accept ^.*@partner\.example$, "
        r"reject ^.*@spam\.example$; troll@example.net banned"
    )
    return done


def has_lists(session: Session) -> bool:
    return bool(session.scalar(select(func.count()).select_from(MailingList)))


def ensure_demo(store: Store) -> list[str] | None:
    """Create/migrate the schema and load the demo data if the store has no lists.
    Returns what was loaded, or ``None`` if the store had lists already."""
    store.upgrade()
    with store.read() as session:
        if has_lists(session):
            return None
    with store.write() as session:
        return load_demo(session)


def write_config(state: Path, tcp: bool = False) -> Path:
    """The demo configuration: Unix sockets (mode 0660) only, unless ``tcp``."""
    text_state = str(state)
    if any(ch.isspace() for ch in text_state):
        raise PolicydError(f"--state-dir {text_state!r}: whitespace in the path cannot be "
                           "written into listen endpoint strings; choose another directory")
    escaped = text_state.replace("\\", "\\\\").replace(":", "\\:")
    path = state / "policyd.conf"
    path.write_text(CONFIG_TEMPLATE.format(
        state=text_state, state_escaped=escaped, exim_tcp=EXIM_TCP if tcp else "",
        postfix_tcp=POSTFIX_TCP if tcp else ""), encoding="utf-8")
    return path


def run(state_dir: str, out: TextIO, tcp: bool = False) -> int:
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    conf = state / "policyd.conf"
    if conf.exists():
        print(f"configuration: {conf} (exists, kept)", file=out)
    else:
        write_config(state, tcp=tcp)
        print(f"configuration: {conf} (written)", file=out)
    cfg = config_module.load(conf)
    if cfg.store.backend != "native":
        print(f"store: backend {cfg.store.backend}, nothing to set up", file=out)
        return 0
    store = Store(cfg.store.url)
    try:
        before = store.revision() if _store_exists(store) else None
        loaded = ensure_demo(store)
        after = store.revision()
    finally:
        store.close()
    state_word = ("created" if before is None else
                  "migrated" if before != after else "up to date")
    print(f"store: {store.describe()} ({state_word}, schema rev {after})", file=out)
    if loaded is None:
        print("demo data: the store has lists already, left unchanged", file=out)
    else:
        print("demo data: loaded", file=out)
        for line in loaded:
            print(f"  {line}", file=out)
    print(howto(cfg, conf), file=out)
    return 0


def howto(cfg, conf: Path) -> str:
    """How to query the daemon once it runs: policyctl, and one line per protocol."""
    ctl = f".venv/bin/policyctl --config {conf}"
    lines = ["", "policyd is starting with these listeners:"]
    for proto, listeners in (("exim", cfg.exim.listen), ("postfix", cfg.postfix.listen)):
        lines += [f"  {proto:8} {listen}" for listen in listeners]
    lines.append(f"  control  {cfg.daemon.control_socket}")
    exim = _unix_path(cfg.exim.listen)
    postfix = _unix_path(cfg.postfix.listen)
    lines += [
        "query it (in another terminal):",
        f"  {ctl} query {DISCUSS} dave@example.com --explain",
        f"  {ctl} query announce@lists.example.org stranger@elsewhere.example "
        "--from 'Editor <editor@example.com>'",
        f"  {ctl} status",
    ]
    if exim:
        lines.append(
            "  printf 'POLICYD/1 list=" + DISCUSS + " sender=%s\\n' "
            "\"$(printf %s stranger@elsewhere.example | base64 -w0)\" "
            f"| socat - UNIX-CONNECT:{exim}; echo")
    if postfix:
        lines.append(
            "  printf 'request=smtpd_access_policy\\nprotocol_state=RCPT\\n"
            "sender=a@b.example\\nrecipient=nolist@lists.example.org\\n\\n' "
            f"| socat - UNIX-CONNECT:{postfix}")
    lines.append("stop it with Ctrl-C.")
    return "\n".join(lines)


def _unix_path(listeners) -> str | None:
    for listen in listeners:
        if listen.startswith("unix:"):
            return listen[len("unix:"):].split(":", 1)[0]
    return None


def _store_exists(store: Store) -> bool:
    from .store.engine import sqlite_path

    path = sqlite_path(store.engine)
    return path is None or path.exists()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m policyd.demo",
        description="Write a demo configuration and store under a state directory.")
    parser.add_argument("--state-dir", required=True,
                        help="directory for policyd.conf, the SQLite store and the sockets")
    parser.add_argument("--tcp", action="store_true",
                        help="also listen on 127.0.0.1 TCP ports 10041 (Exim) and 10040 "
                             "(Postfix); by default only Unix sockets (mode 0660)")
    args = parser.parse_args(argv)
    try:
        return run(args.state_dir, sys.stdout, tcp=args.tcp)
    except (PolicydError, config_module.ConfigError, OSError) as error:
        print(f"policyd.demo: error: {error}", file=sys.stderr)
        return getattr(error, "exit_code", 1)


if __name__ == "__main__":
    sys.exit(main())
