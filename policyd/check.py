"""``policyd --check-config``: what start-up and the first answers would hit, checked now.

``config.load`` has validated every key's syntax; this adds what only shows later:

* every ``[smtp]`` reply template rendered with sample values as the daemon renders it
  (``ReplyPolicy._reply``): an unknown placeholder (``{lst}``) would turn every such
  answer into the error 4xx at runtime; the error names the key and the allowed ones;
* every listener endpoint parsed with Twisted's own parser, TCP ports in range
  (``tcp:99999`` parses, and fails only when it binds); a ``systemd:`` endpoint is
  accepted with a note, since its descriptors exist only when systemd starts policyd;
* the store URL parsed and its driver imported (``store.engine.make_engine``, as at
  start-up; nothing is connected to);
* ``config.check_paths``: the log file writable, the socket directories there;
* ``[mailman] config_file``: ``config.load`` has read Mailman's ``[antispam]`` from it (a
  file Mailman could not use is an error there); the lines Mailman skips, and policyd
  with it, are printed as notes.

``template_problems`` and ``endpoint_problems`` also run at every start-up
(``tap.load_config``), so a daemon never starts with what the check refuses.  Exit
status of ``check_config``: 0 when start-up would succeed, 2 otherwise.
"""

from __future__ import annotations

import dataclasses
import os
from typing import IO

from .config import Config, ConfigError, check_paths, listener_keys, load
from .core.replies import Outcome
from .core.verdict import Decision, Role, Verdict

__all__ = ["PLACEHOLDERS", "template_problems", "endpoint_problems", "store_problems",
           "check_config"]

#: What ``ReplyPolicy._reply`` fills in a template (tests/test_check.py keeps this list
#: and that method in step).
PLACEHOLDERS = ("list", "recipient", "sender", "rule")

_LIST = "team@lists.example.org"


def _sample(verdict: Verdict, rule: str) -> Decision:
    return Decision(verdict, rule, "", None, "someone@example.net", _LIST, Role.POST, None,
                    ("someone@example.net",))


#: key -> the decision whose reply renders it (with ``discard`` mapped to reject).
_SAMPLES = {
    "reject_text": _sample(Verdict.REJECT, "nonmember-moderation"),
    "unknown_list_text": _sample(Verdict.REJECT, "unknown-list"),
    "null_sender_text": _sample(Verdict.REJECT, "null-sender"),
    "discard_reject_text": _sample(Verdict.DISCARD, "nonmember-moderation"),
    "defer_text": _sample(Verdict.DEFER, "broken-list"),
}


def template_problems(config: Config) -> list[str]:
    """One message per ``[smtp]`` template that cannot be rendered."""
    policy = dataclasses.replace(config.smtp, discard=Outcome.REJECT)
    allowed = ", ".join("{" + name + "}" for name in PLACEHOLDERS)
    problems = []
    for key, decision in _SAMPLES.items():
        try:
            policy._reply(decision)
        except KeyError as error:
            problems.append(f"[smtp] {key} = {getattr(config.smtp, key)!r}: unknown "
                            f"placeholder {{{error.args[0]}}} (allowed: {allowed})")
        except Exception as error:  # IndexError ({0}), ValueError (a lone brace)...
            problems.append(f"[smtp] {key} = {getattr(config.smtp, key)!r}: not a usable "
                            f"template ({error}; allowed placeholders: {allowed}; write "
                            "a literal brace as {{ or }})")
    return problems


def endpoint_problems(config: Config, *, systemd_now: bool = True
                      ) -> tuple[list[str], list[str]]:
    """(problems, notes) for the listener endpoints.  ``systemd_now``: resolve
    ``systemd:`` endpoints against the descriptors this process was given (start-up);
    else only their syntax is checked, with a note."""
    from twisted.internet.endpoints import _parse

    from .listeners import parse_endpoint

    problems, notes = [], []
    for key, description in listener_keys(config):
        try:
            args, kwargs = _parse(description)
        except Exception as error:
            problems.append(f"{key} = {description}: not an endpoint string ({error})")
            continue
        kind = args[0] if args else ""
        if kind == "systemd" and not systemd_now:
            problem = _systemd_problem(args[1:], kwargs)
            if problem:
                problems.append(f"{key} = {description}: {problem} (allowed: "
                                "systemd:domain=UNIX:name=NAME or systemd:domain=UNIX:index=N)")
            else:
                notes.append(f"{key} = {description}: a socket passed by systemd, checked "
                             "when systemd starts policyd (LISTEN_FDS, FileDescriptorName=)")
            continue
        try:
            parse_endpoint(None, key, description)
        except ConfigError as error:
            problems.append(str(error))
            continue
        if kind in ("tcp", "tcp6", "ssl"):
            port = kwargs.get("port", args[1] if len(args) > 1 else None)
            try:
                number = int(port)
            except (TypeError, ValueError):
                number = -1
            if not 0 <= number <= 65535:
                problems.append(f"{key} = {description}: port {port} is out of range "
                                "(allowed: 0 to 65535)")
    return problems, notes


def _systemd_problem(args, kwargs) -> str | None:
    if args:
        return f"unexpected positional value {args[0]!r}"
    unknown = set(kwargs) - {"domain", "index", "name"}
    if unknown:
        return f"unknown option {sorted(unknown)[0]!r}"
    if kwargs.get("domain") not in ("UNIX", "INET", "INET6"):
        return "domain must be UNIX, INET or INET6"
    if ("index" in kwargs) == ("name" in kwargs):
        return "give exactly one of index= and name="
    if "index" in kwargs and not kwargs["index"].isdigit():
        return "index must be a whole number"
    return None


def store_problems(config: Config) -> list[str]:
    """The store URL parses and its driver imports, as start-up will need."""
    from .errors import PolicydError
    from .store.engine import make_engine, safe_url

    try:
        engine = make_engine(config.store.url, timeouts=config.store.timeouts)
    except PolicydError as error:
        return [f"[store] url: {error}"]
    except Exception as error:
        return [f"[store] url = {safe_url(config.store.url)}: cannot be used ({error})"]
    engine.dispose()
    return []


def check_config(path, out: IO[str], err: IO[str]) -> int:
    """Run every check, print each problem and note; 0 when start-up would succeed."""
    try:
        config = load(path)
    except ConfigError as error:
        print(f"policyd: {error}", file=err)
        return 2
    problems = template_problems(config)
    endpoint_errors, notes = endpoint_problems(config, systemd_now=False)
    problems += endpoint_errors
    problems += store_problems(config)
    try:
        check_paths(config)
    except ConfigError as error:
        text = str(error)
        prefix = f"{config.source}: "
        problems.append(text[len(prefix):] if text.startswith(prefix) else text)
    site = config.store.site_header_checks
    if site.source:
        notes.append(f"[mailman] config_file: {len(site.checks)} site header_checks "
                     f"line{'' if len(site.checks) == 1 else 's'} from {site.source}, "
                     f"jump_chain {site.jump_chain.label}")
    notes += [f"[mailman] config_file: {note}" for note in site.notes]
    psl = config.dmarc.public_suffix_list
    if not os.access(psl, os.R_OK):
        notes.append(f"[dmarc] public_suffix_list = {psl}: not readable; dmarc-mitigation "
                     "takes the last two labels as the organizational domain (install "
                     "Debian's publicsuffix, or name the file)")
    for note in notes:
        print(f"policyd: note: {note}", file=out)
    for problem in problems:
        print(f"policyd: {config.source}: {problem}", file=err)
    if problems:
        print(f"policyd: {config.source}: {len(problems)} problem"
              f"{'s' if len(problems) > 1 else ''}: policyd would not start", file=err)
        return 2
    print(f"policyd: {config.source}: configuration OK", file=out)
    return 0
