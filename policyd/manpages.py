"""The manual pages policyd(8), policyctl(8) and policyd.conf(5), generated from the code,
and the commented default ``policyd.conf`` the Debian package ships.

What can drift is read from the code at build time: ``policyctl``'s argparse parser (every
command, subcommand, option, choice and the exit codes of its epilog), ``policyd``'s own
parser, and ``policyd.config.SCHEMA`` (every section and key with its type, its default and
what it allows, the last asked of the key's own parser).  The prose this module adds is the
description of each configuration key (``KEY_HELP``) and the parts of policyd(8) no parser
knows (signals, files, the protocols in short); the tests fail when a key has no
description or a command no entry.

The pages are written as reStructuredText and turned into roff by docutils' manpage writer
(``python3-docutils`` in Debian): one well-kept converter for all three pages, including
policyd.conf(5), which no argparse-to-man tool could write.

    python -m policyd.manpages --outdir DIR [--format man|rst] [--conf FILE]
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, Iterator

from . import __version__

PAGES = {"policyd.8": "policyd", "policyctl.8": "policyctl", "policyd.conf.5": "conf"}

# --- configuration keys: the prose the schema cannot carry -------------------------------

KEY_HELP: dict[str, dict[str, str]] = {
    "store": {
        "backend": "native: policyd's own store, written with policyctl(8). mailman3: read a "
                   "Mailman 3 core database directly and read-only.",
        "url": "SQLAlchemy URL of the store. Empty: sqlite:///STATE_DIR/policyd.sqlite. "
               "PostgreSQL: postgresql://user:password@host/db; MariaDB or MySQL: "
               "mysql+pymysql://user:password@host/db?charset=utf8mb4. Required for mailman3 "
               "(the [database] url of mailman.cfg).",
        "refresh_interval": "Seconds between checks of the store's change token; a change "
                            "is answered within about this time.",
        "connect_timeout": "Seconds to open a connection to the store.",
        "statement_timeout": "Seconds one statement may run (PostgreSQL statement_timeout, "
                             "MariaDB max_statement_time, plus a client-side read timeout).",
        "lock_timeout": "Seconds to wait for a lock (PostgreSQL lock_timeout, MariaDB "
                        "innodb_lock_wait_timeout, SQLite's busy timeout).",
        "refresh_timeout": "A refresh still running after this many seconds is logged once "
                           "and makes policyctl status report the store unhealthy; the last "
                           "good snapshot keeps serving (up to max_stale).",
        "max_stale": "Seconds the snapshot may go without the store confirming it as its "
                     "current state (a refresh that succeeded); past it every query about a "
                     "list domain gets the temporary [smtp] error reply until a refresh "
                     "succeeds, and "
                     "policyctl status reports the store unhealthy. More than "
                     "refresh_interval + 2 x refresh_timeout; 0: never (the last good "
                     "snapshot serves for as long as the store fails).",
        "verify_interval": "mailman3 backend: every this many seconds a full build is "
                           "compared with the incrementally maintained snapshot; 0 disables "
                           "the check.",
        "listen_notify": "on: with the native store on PostgreSQL, the daemon LISTENs on a "
                         "connection of its own for the NOTIFY its triggers send on every "
                         "change and refreshes at once (polling every refresh_interval "
                         "stays the fallback; status shows store listen). Other stores "
                         "are polled whatever this says. off: poll only.",
        "watch_interval": "Native store on SQLite: every this many seconds a thread of "
                          "the daemon looks at the database file and its -wal (stat; "
                          "it opens neither) and, when a commit or a replaced file "
                          "changed them, checks the change token at once, so a change is "
                          "answered within about this time plus its refresh (at least "
                          "0.05). 0: poll "
                          "every refresh_interval only. Other stores ignore it.",
    },
    "daemon": {
        "state_dir": "Directory of the default SQLite store.",
        "control_socket": "Unix socket for policyctl query, status and reload.",
        "control_socket_mode": "Permissions of the control socket; a mode open to other "
                               "users is refused.",
        "max_buffered": "Bytes of incomplete requests all listeners buffer together; above "
                        "it the connections idle longest are closed first.",
        "log_file": "Log to this file instead of standard output (the journal under "
                    "systemd). SIGHUP reopens it; a file policyd creates is mode 0640.",
        "log_level": "debug, info (one line per decision), warn (no decision lines) or "
                     "error.",
        "shutdown_grace": "Seconds SIGTERM waits for the requests in flight.",
        "fail_closed": "on: a snapshot without lists, or an Exim question about a domain "
                       "that is not a list domain, gets the temporary [smtp] error reply "
                       "instead of an answer from an empty or wrong store.",
    },
    "exim": {
        "listen": "Whitespace-separated Twisted endpoint strings, any number; empty: no "
                  "Exim listener.",
        "timeout": "Seconds to receive the request line; then DEFER 451 4.3.0.",
        "max_request": "Longest request line in bytes.",
        "max_connections": "Connections the listener holds at once. At the limit the "
                           "peer (uid of a Unix socket's client, TCP address) holding the "
                           "most gives way to other peers' newcomers first.",
    },
    "postfix": {
        "listen": "Whitespace-separated Twisted endpoint strings, any number; empty: no "
                  "Postfix listener. A chrooted smtpd (Debian's default) reaches "
                  "unix:/var/spool/postfix/policyd/postfix.sock:mode=660 as "
                  "unix:policyd/postfix.sock.",
        "mode": "safe: decide only what the envelope settles (unknown list, null sender), "
                "answer DUNNO otherwise. envelope: decide membership on the envelope sender "
                "alone (wrong for forwarders, SRS and VERP).",
        "accept_action": "What an accepted post answers in envelope mode.",
        "idle_timeout": "Seconds an idle connection stays open; must exceed Postfix's 300 s "
                        "smtpd_policy_service_max_idle.",
        "max_line": "Longest attribute line in bytes.",
        "max_attributes": "Most attributes in one request.",
        "max_request": "Longest request in bytes.",
        "request_timeout": "Seconds a connection may hold an incomplete request (or none "
                           "yet); then 451 4.3.0 and close.",
        "max_connections": "Connections the listener holds at once. At the limit the "
                           "peer (uid of a Unix socket's client, TCP address) holding the "
                           "most gives way to other peers' newcomers first.",
    },
    "metrics": {
        "listen": "One Twisted endpoint string for the Prometheus metrics page (counters, "
                  "latency histograms, snapshot and store state, connections); empty: no "
                  "metrics endpoint.",
        "per_list": "Also count answers per list (one series per list and verdict).",
    },
    "rules": {
        "null_sender": "reject: the null sender <> may only write to a list's -bounces "
                       "address (rejected at SMTP time elsewhere). mailman: no such rule, "
                       "the list's chain decides as Mailman does.",
        "role_addresses": "Local parts (comma-separated) that are no list in a list "
                          "domain but the MTA's own: the role-address rule answers no "
                          "opinion for them (Postfix DUNNO, Exim ACCEPT 250 2.0.0), so "
                          "the MTA's aliases decide, as RFC 5321 section 4.5.1 "
                          "(postmaster) and RFC 2142 (abuse) expect. A list of that name "
                          "keeps its list. Empty: none (every unknown local part gets "
                          "the 550 5.1.1).",
    },
    "mailman": {
        "config_file": "Mailman 3's site configuration file (mailman.cfg; relative to "
                       "this file's directory). policyd reads its [antispam] header_checks "
                       "and jump_chain at start-up, as Mailman does, and applies them "
                       "before each list's header_matches. Empty: no site header checks, "
                       "jump_chain hold (Mailman's defaults).",
    },
    "moderation": {
        "min_delay": "greylist: a retry sooner than this many seconds after the first "
                     "attempt is deferred again.",
        "max_age": "greylist: a retry later than this many seconds after the first attempt "
                   "counts as a first attempt again; moderate: how long a decided ticket "
                   "answers retries.",
        "remember": "greylist: seconds a sender that passed is not deferred again on that "
                    "list; 0: never remembered.",
        "decide_within": "moderate: a post no moderator decided on within this many "
                         "seconds gets the list's normal outcome (Mailman's hold queue).",
        "max_entries": "At most this many greylist entries, and as many remembered "
                       "senders; beyond it the oldest go first (logged).",
        "max_tickets": "At most this many moderation tickets; beyond it the oldest go "
                       "first (logged).",
        "sync_interval": "Seconds between two syncs of a daemon's moderation state with "
                         "the store (its writes, other daemons' and moderators' changes).",
    },
    "dmarc": {
        "nameservers": "DNS servers for the DMARC lookups (host, host:port or "
                       "[IPv6]:port). Empty: those of /etc/resolv.conf at start-up.",
        "timeout": "Seconds one DMARC lookup may take (two tries); a timeout counts as "
                   "a DNS failure, which mitigates as in Mailman.",
        "cache_ttl": "Seconds an answer (a record, NXDOMAIN, no record) is cached.",
        "failure_ttl": "Seconds a failed lookup is cached.",
        "cache_size": "At most this many names cached (least recently used out first).",
        "public_suffix_list": "The public suffix list file for organizational domains "
                              "(Mailman downloads org_domain_data_url; policyd reads "
                              "Debian's publicsuffix package). Missing: the last two "
                              "labels (warned).",
    },
    "runtime": {
        "reactor": "The epoll reactor without Twisted's per-event legacy log context "
                   "(policyd command; twist --reactor=policyd).",
        "fast_write": "Send a Postfix answer at once instead of on the next reactor turn; "
                      "send an Exim answer and close its connection in the same turn.",
        "fast_read": "Read the Unix sockets with recv, not recvmsg (policyd never takes "
                     "file descriptors from a peer; the kernel drops any sent).",
        "fast_accept": "Answer an Exim request that has arrived whole by the time its "
                       "connection is accepted right there, without a Twisted transport.",
        "turn_writes": "Send the Postfix answers, and the Exim answers made at accept, "
                       "of one reactor turn together at its end (at most 16 held), so "
                       "that a client with many connections wakes once per turn (needs "
                       "reactor and fast_write).",
        "pacing": "The snapshot builder rests while the reactor has events to handle.",
        "heap": "No cyclic garbage collection during builds, gc.freeze after the first "
                "load, old snapshots freed piece by piece, malloc_trim afterwards.",
        "store_niceness": "Niceness of the store thread.",
        "switch_interval": "The interpreter's thread switch interval in seconds "
                           "(sys.setswitchinterval).",
    },
    "smtp": {
        "hold": "A held post: accept (Mailman holds it) or hold (the MTA holds it).",
        "discard": "A discarded post: discard (dropped silently) or reject.",
        "reject_code": "SMTP code of a rejection.",
        "reject_status": "Enhanced status code of a rejection.",
        "reject_text": "Rejection text when the list has no rejection notice of its own; "
                       "{list} is replaced by the list address.",
        "unknown_list_text": "Text of the 550 5.1.1 for a list domain address that is no "
                             "list; {recipient} is replaced.",
        "null_sender_text": "Text of the rejection of the null sender; {recipient} is "
                            "replaced.",
        "discard_reject_text": "Text of the rejection that replaces a discard with discard "
                               "= reject.",
        "defer_code": "SMTP code of a defer verdict.",
        "defer_status": "Enhanced status code of a defer verdict.",
        "defer_text": "Text of a defer verdict.",
        "error_code": "SMTP code for policyd's own trouble (no snapshot yet, an error in "
                      "the decision); always 4xx.",
        "error_status": "Enhanced status code for policyd's own trouble.",
        "error_text": "Text for policyd's own trouble.",
    },
}

SECTION_HELP = {
    "store": "Where the lists, members and patterns come from.",
    "daemon": "The process: state, control socket, logging, shutdown, shared limits.",
    "exim": "Listeners for Exim's ${readsocket} one-line protocol.",
    "postfix": "Listeners for the Postfix policy delegation protocol "
               "(check_policy_service).",
    "metrics": "The Prometheus endpoint (off by default).",
    "rules": "Rules policyd adds to Mailman's.",
    "mailman": "Mailman's own site settings that its posting chain reads.",
    "moderation": "SMTP-time moderation of nonmember posts, for the lists whose "
                  "smtp_moderation is greylist or moderate (policyctl list set).",
    "dmarc": "DNS lookups of the dmarc-mitigation rule, for the lists whose "
             "dmarc_mitigate_action is reject or discard (policyctl list set).",
    "runtime": "Tuning that reaches into the interpreter or Twisted internals; each part "
               "checks that the code it depends on is the one it was written for, else "
               "steps aside and logs why.",
    "smtp": "The SMTP reply for each verdict.",
}

# How a value parser of policyd.config is described (by the function that builds it).
TYPE_NAMES = {
    "_choice": "one of", "_positive_float": "seconds", "_seconds_or_zero": "seconds",
    "_positive_int": "integer", "_mode": "octal mode", "_private_mode": "octal mode",
    "_listeners": "endpoint list", "_switch": "boolean", "_niceness": "integer",
    "_text": "text", "_metrics_listen": "endpoint", "_nameservers": "address list", "_code": "SMTP code", "_status": "enhanced status code",
}


def value_type(parse: Callable) -> str:
    name = getattr(parse, "__qualname__", getattr(parse, "__name__", "value"))
    name = name.split(".<locals>")[0].split(".")[-1]
    return TYPE_NAMES.get(name, name.strip("_").replace("_", " ") or "value")


def allowed(parse: Callable) -> str:
    """What the key's own parser says it allows (its error for an impossible value)."""
    for probe in ("\x00 not\nvalid", "-1", ""):
        try:
            parse(probe)
        except ValueError as error:
            text = str(error)
            if text.startswith("allowed: "):
                return text[len("allowed: "):]
        except Exception:  # a parser that fails otherwise says nothing useful
            continue
    return ""


def schema_entries() -> Iterator[tuple[str, str, str, str, str, str]]:
    """(section, key, type, default, allowed, description) for every key of the schema."""
    from .config import SCHEMA

    for section, keys in SCHEMA.items():
        for key, (parse, default) in keys.items():
            yield (section, key, value_type(parse), default, allowed(parse),
                   KEY_HELP.get(section, {}).get(key, ""))


def missing_key_help() -> list[str]:
    return [f"[{s}] {k}" for s, k, _, _, _, help_ in schema_entries() if not help_]


# --- finding the parsers (policyd/ctl/ package or a policyd/ctl.py module) ------------------

PARSER_FUNCTIONS = ("build_parser", "make_parser", "create_parser", "get_parser", "parser")


def _parser_from(module_names, call: Callable[[Callable], object]) -> argparse.ArgumentParser:
    for module_name in module_names:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            if error.name and module_name.startswith(error.name):
                continue
            raise
        for name in PARSER_FUNCTIONS + ("_parser", "_build_parser"):
            found = getattr(module, name, None)
            if isinstance(found, argparse.ArgumentParser):
                return found
            if callable(found):
                parser = call(found)
                if isinstance(parser, argparse.ArgumentParser):
                    return parser
    raise LookupError(f"no argparse parser found in {', '.join(module_names)}")


def ctl_parser() -> argparse.ArgumentParser:
    return _parser_from(("policyd.ctl", "policyd.ctl.cli", "policyd.ctl.parser"),
                        lambda f: f())


def daemon_parser() -> argparse.ArgumentParser:
    def call(f):
        try:
            return f({})
        except TypeError:
            return f()
    return _parser_from(("policyd.daemon",), call)


# --- walking a parser ---------------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, parser, help, aliases) for every subcommand, depth first, in --help order."""
    sub = _subparsers(parser)
    if sub is None:
        return
    for choice in sub._choices_actions:
        name = choice.dest
        child = sub.choices[name]
        aliases = sorted(a for a, p in sub.choices.items() if p is child and a != name)
        yield path + (name,), child, choice.help or "", aliases
        yield from commands(child, path + (name,))


def options(parser: argparse.ArgumentParser):
    """The arguments a reader needs: no -h, no hidden ones, no subcommand placeholder."""
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.help == argparse.SUPPRESS:
            continue
        yield action


# --- reStructuredText -----------------------------------------------------------------------


def esc(text: str) -> str:
    return re.sub(r"([\\*`|_<>\[\]])", r"\\\1", " ".join(str(text).split()))


def literal(text: str) -> str:
    text = str(text)
    if "``" in text or not text.strip():
        return esc(text)
    return f"``{text}``"


def title(name: str, summary: str, section: str) -> list[str]:
    bar = "=" * len(name)
    sub = "-" * len(summary)
    lines = [bar, name, bar, "", sub, esc(summary), sub, "",
             f":Manual section: {section}", ":Manual group: policyd",
             f":Version: policyd {__version__}"]
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch and epoch.isdigit():
        lines.append(":Date: " + time.strftime("%Y-%m-%d", time.gmtime(int(epoch))))
    return lines + [""]


def heading(text: str, char: str = "=") -> list[str]:
    return [text, char * len(text), ""]


def usage_block(parser: argparse.ArgumentParser) -> list[str]:
    usage = parser.format_usage().strip()
    usage = re.sub(r"^usage:\s*", "", usage)
    usage = " ".join(usage.split())
    wrapped = textwrap.wrap(usage, 72, subsequent_indent="    ", break_on_hyphens=False)
    return ["::", ""] + ["   " + line for line in wrapped] + [""]


def option_entries(parser: argparse.ArgumentParser) -> list[str]:
    lines: list[str] = []
    for action in options(parser):
        if action.option_strings:
            metavar = action.metavar or (action.dest.upper() if action.nargs != 0 else None)
            if action.nargs == 0:
                term = ", ".join(literal(o) for o in action.option_strings)
            else:
                if action.choices and not action.metavar:
                    metavar = "{" + ",".join(map(str, action.choices)) + "}"
                term = ", ".join(f"{literal(o)} *{esc(metavar)}*"
                                 for o in action.option_strings)
        else:
            metavar = action.metavar or action.dest
            term = f"*{esc(metavar)}*"
            if action.nargs in ("*", "?"):
                term = f"[{term}]" if action.nargs == "?" else f"[{term} ...]"
            elif action.nargs == "+":
                term += " ..."
        help_ = action.help or ""
        if "%(" in help_:
            try:
                help_ = help_ % {**vars(action), "prog": parser.prog}
            except (KeyError, TypeError, ValueError):
                pass
        if action.choices and action.option_strings == [] and "allowed" not in help_:
            help_ = (help_ + " " if help_ else "") + "(one of: " + ", ".join(
                map(str, action.choices)) + ")"
        if (action.default not in (None, False, argparse.SUPPRESS) and action.nargs != 0
                and "default" not in help_.lower() and action.option_strings):
            help_ += f" (default: {action.default})"
        lines += [term, "    " + (esc(help_) or "\\ "), ""]
    return lines


def exit_codes(epilog: str | None) -> list[tuple[str, str]]:
    """``exit codes: 0 ok, 2 bad input, ...`` in an epilog, as (code, meaning) pairs."""
    if not epilog:
        return []
    match = re.search(r"exit (?:codes|status)\s*:\s*(.*)", epilog, re.S | re.I)
    if not match:
        return []
    return re.findall(r"(\d+)\s+([^,]+?)(?=,\s*\d+\s|$)", " ".join(match.group(1).split()))


def policyctl_rst() -> str:
    parser = ctl_parser()
    out = title("policyctl", "manage policyd's store and ask the daemon about posts", "8")
    out += heading("SYNOPSIS") + usage_block(parser)
    out += heading("DESCRIPTION")
    out += [esc(parser.description or ""), "",
            "Store commands run without the daemon, each in one transaction: a command that "
            "fails writes nothing. **query** asks the running daemon over its control "
            "socket (or decides from the store with **--offline**); **status** and "
            "**reload** talk to the daemon.", ""]
    out += heading("GLOBAL OPTIONS") + option_entries(parser)
    out += heading("COMMANDS")
    for path, child, help_, aliases in commands(parser):
        name = "policyctl " + " ".join(path)
        also = f" (also: {', '.join(aliases)})" if aliases else ""
        out += heading(name + also, "-")
        text = child.description or help_
        out += [esc(text) if text else "\\ ", ""]
        out += usage_block(child)
        entries = option_entries(child)
        if entries:
            out += entries
    codes = exit_codes(parser.epilog)
    if codes:
        out += heading("EXIT STATUS")
        for code, meaning in codes:
            out += [f"**{code}**", "    " + esc(meaning.strip()), ""]
    out += heading("ENVIRONMENT")
    out += ["**POLICYD_CONFIG**", "    The configuration file when **--config** is not "
            "given (default /etc/policyd/policyd.conf).", ""]
    out += heading("EXAMPLES") + ["::", ""] + ["   " + line for line in (
        "policyctl init",
        "policyctl domain add lists.example.org",
        "policyctl list add team@lists.example.org --default-nonmember-action reject",
        "policyctl member add team@lists.example.org alice@example.com",
        "policyctl query team@lists.example.org stranger@elsewhere.example --explain",
        "policyctl import-mailman2 /var/lib/mailman",
    )] + [""]
    out += heading("SEE ALSO") + [
        "**policyd**\\ (8), **policyd.conf**\\ (5); /usr/share/doc/policyd/ "
        "(the administrator's guide).", ""]
    return "\n".join(out)


def policyd_rst() -> str:
    parser = daemon_parser()
    out = title("policyd", "SMTP-time mailing-list posting policy daemon", "8")
    out += heading("SYNOPSIS") + usage_block(parser) + [
        "**twist policyd** [**--config** *PATH*]", ""]
    out += heading("DESCRIPTION")
    out += [esc(parser.description or ""), "",
            "policyd tells Exim or Postfix, while the SMTP conversation is still open, "
            "whether a sender may post to a mailing list, with Mailman's own rules "
            "(Mailman 3 by default, Mailman 2.1 per list): non-member posts are refused in "
            "the SMTP dialogue, so no bounce goes to a forged sender. It reads its data "
            "from its own SQL store (written with **policyctl**\\ (8)) or read-only from a "
            "Mailman 3 database, keeps an immutable snapshot in memory and rebuilds it in "
            "a thread when the store changes. Its own trouble (no snapshot yet, an error) "
            "is always a temporary failure, never a rejection.", "",
            "**policyd** runs in the foreground (systemd's policyd.service); **twist "
            "policyd** runs the same service under Twisted's twist.", ""]
    out += heading("OPTIONS") + option_entries(parser)
    out += heading("PROTOCOLS")
    out += ["**Exim** (``${readsocket}`` in the DATA ACL): one request line per "
            "connection, ``POLICYD/1 list=ADDR[,ADDR...] sender=B64 from=B64 "
            "reply_to=B64 sender_header=B64 [id=TOKEN]``, values base64 of the envelope "
            "sender and the raw headers; ended by a newline or Exim's half-close. The "
            "reply is one line without a trailing newline, ``OUTCOME CODE X.Y.Z TEXT``, "
            "OUTCOME one of ACCEPT, HOLD, DISCARD, REJECT, DEFER; then policyd closes.", "",
            "**Postfix** (``check_policy_service``): the policy delegation protocol, "
            "``name=value`` lines ended by an empty line, answered ``action=...`` and an "
            "empty line, on a connection that stays open. Only protocol_state=RCPT is "
            "decided, on the recipient and the envelope sender; Postfix sends no headers.",
            "",
            "**Control** (``[daemon] control_socket``): JSON lines for **policyctl query**, "
            "**status** and **reload**.", "",
            "Malformed requests are answered with a temporary failure (451 4.3.0), never "
            "dropped.", ""]
    out += heading("SIGNALS")
    out += ["**SIGHUP**", "    Reload the data from the store now and reopen the log file.",
            "", "**SIGTERM**, **SIGINT**",
            "    Close the listeners, let the requests in flight finish for up to "
            "``[daemon] shutdown_grace`` seconds, close the store and exit 0.", ""]
    out += heading("EXIT STATUS")
    out += ["**0**", "    Stopped by SIGTERM or SIGINT (or **--check-config** found the "
            "file valid).", "",
            "**1**", "    Start-up failed: a listener could not bind, or the store could "
            "not be opened.", "",
            "**2**", "    Configuration error; the message names the file, the key and "
            "what is allowed.", ""]
    out += heading("ENVIRONMENT")
    out += ["**POLICYD_CONFIG**", "    The configuration file when **--config** is not "
            "given.", "",
            "**JOURNAL_STREAM**", "    Set by systemd: log lines go to the journal with "
            "their priority and without a timestamp.", ""]
    out += heading("FILES")
    out += ["*/etc/policyd/policyd.conf*", "    The configuration, **policyd.conf**\\ (5).",
            "", "*/var/lib/policyd/policyd.sqlite*", "    The default native store.", "",
            "*/run/policyd/exim.sock*, */run/policyd/postfix.sock*",
            "    The default MTA sockets (mode 0660, group policyd).", "",
            "*/run/policyd/control.sock*", "    The control socket.", "",
            "*/usr/lib/systemd/system/policyd.service*, *policyd-exim.socket*, "
            "*policyd-postfix.socket*", "    The systemd units (the sockets are optional).",
            ""]
    out += heading("SEE ALSO") + [
        "**policyctl**\\ (8), **policyd.conf**\\ (5), **exim4**\\ (8), **postconf**\\ (5); "
        "/usr/share/doc/policyd/ (the administrator's guide).", ""]
    return "\n".join(out)


def conf_rst() -> str:
    from .config import SCHEMA

    out = title("policyd.conf", "configuration file of policyd", "5")
    out += heading("SYNOPSIS") + ["*/etc/policyd/policyd.conf*", ""]
    out += heading("DESCRIPTION")
    out += ["An INI file read by **policyd**\\ (8) and **policyctl**\\ (8) at start-up. "
            "Every key is optional: a missing key has its default. An unknown section or "
            "key and a bad value stop start-up with a message that names the file, the key "
            "and what is allowed (**policyd --check-config** checks a file). Relative "
            "paths are relative to the file's directory; endpoint strings are passed to "
            "Twisted as written. Keys are case-sensitive; there is no interpolation.", "",
            "A listen value is a list of Twisted endpoint strings separated by whitespace, "
            "such as ``unix:/run/policyd/exim.sock:mode=660``, "
            "``tcp:10040:interface=127.0.0.1`` or ``systemd:domain=UNIX:name=exim`` (socket "
            "activation).", ""]
    entries = {section: [] for section in SCHEMA}
    for section, key, kind, default, allows, help_ in schema_entries():
        entries[section].append((key, kind, default, allows, help_))
    for section, keys in entries.items():
        out += heading(f"[{section}]")
        if SECTION_HELP.get(section):
            out += [esc(SECTION_HELP[section]), ""]
        for key, kind, default, allows, help_ in keys:
            shown = literal(default) if default != "" else "(empty)"
            out += [f"**{key}** = {shown}"]
            body = [esc(help_) if help_ else "(not described yet)", "",
                    f"Type: {esc(kind)}. Default: {shown}."
                    + (f" Allowed: {esc(allows)}." if allows else "")]
            out += ["    " + line if line else "" for line in body] + [""]
    out += heading("EXAMPLE") + ["::", ""] + ["   " + line for line in (
        "[store]", "backend = mailman3", "url = postgresql://policyd:SECRET@localhost/mailman",
        "", "[exim]", "listen = unix:/run/policyd/exim.sock:mode=660", "",
        "[postfix]", "listen = unix:/var/spool/postfix/policyd/postfix.sock:mode=660")] + [""]
    out += heading("SEE ALSO") + ["**policyd**\\ (8), **policyctl**\\ (8)", ""]
    return "\n".join(out)


def default_conf() -> str:
    """The commented configuration file of the package: every key at its default."""
    lines = ["# /etc/policyd/policyd.conf: policyd's configuration (policyd.conf(5)).",
             "# Every key is shown commented out with its default; uncomment to change it.",
             "# Check a change with `policyd --check-config`, then `systemctl reload "
             "policyd`",
             "# (data) or `systemctl restart policyd` (anything else).", ""]
    current = None
    for section, key, kind, default, allows, help_ in schema_entries():
        if section != current:
            if current is not None:
                lines.append("")
            lines += [f"[{section}]"]
            current = section
        for text in textwrap.wrap(help_, 86):
            lines.append(f"# {text}")
        if allows and kind in ("one of", "boolean"):
            lines.append(f"# Allowed: {allows}.")
        lines.append(f"#{key} = {default}".rstrip())
    return "\n".join(lines) + "\n"


RST = {"policyd": policyd_rst, "policyctl": policyctl_rst, "conf": conf_rst}


def render(rst: str) -> str:
    from docutils.core import publish_string
    from docutils.writers import manpage

    result = publish_string(rst, writer=manpage.Writer(), settings_overrides={
        "report_level": 2, "halt_level": 2, "output_encoding": "unicode",
        "input_encoding": "unicode", "smart_quotes": False, "_disable_config": True})
    return result if isinstance(result, str) else result.decode("utf-8")


def write(outdir: Path, fmt: str = "man") -> list[Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, which in PAGES.items():
        rst = RST[which]()
        path = outdir / (filename if fmt == "man" else filename + ".rst")
        path.write_text(render(rst) if fmt == "man" else rst, encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m policyd.manpages",
        description="Write policyd(8), policyctl(8) and policyd.conf(5) from the code.")
    parser.add_argument("--outdir", type=Path, help="write the pages here")
    parser.add_argument("--format", choices=("man", "rst"), default="man")
    parser.add_argument("--conf", type=Path,
                        help="also write the commented default policyd.conf here")
    args = parser.parse_args(argv)
    missing = missing_key_help()
    if missing:
        print("policyd.manpages: warning: configuration keys without a description: "
              + ", ".join(missing), file=sys.stderr)
    if args.outdir:
        for path in write(args.outdir, args.format):
            print(path)
    if args.conf:
        args.conf.parent.mkdir(parents=True, exist_ok=True)
        args.conf.write_text(default_conf(), encoding="utf-8")
        print(args.conf)
    return 0


if __name__ == "__main__":
    sys.exit(main())
