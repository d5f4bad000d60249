"""Mailman 3's site configuration file, as far as a posting decision needs it.

Mailman 3.3.10 reads ``mailman.cfg`` with lazr.config: the text is dedented and parsed
by ``configparser.RawConfigParser(strict=False)`` (keys lower-cased, continuation lines
joined with newlines, ``#``/``;`` comment lines), a ``[meta] extends`` file is read first
and overlaid key by key.  Of it policyd reads the ``[antispam]`` section
(``mailman/config/schema.cfg``; defaults: no ``header_checks``, ``jump_chain: hold``),
split and compiled exactly as ``mailman/chains/headers.py`` ``HeaderMatchChain`` does:

* every line of ``header_checks`` that is not blank is ``Header: regexp``, split at the
  first colon; the header name is kept as written (a field name is compared ignoring
  case), the pattern has its leading white space removed; a line without a colon is
  skipped (Mailman logs it), and so is a pattern that does not compile (Mailman's rule
  misses on it);
* the rule of line *n* (counted over all lines of the value, blank ones too) is named
  ``header-match-config-<n>``;
* ``jump_chain`` is the chain a site match jumps to, and the chain of every list
  ``header_matches`` entry without its own; Mailman looks it up for every post, so a
  name that is no chain breaks every post: here it is an error.  policyd can take the
  four terminal chains (``accept``, ``hold``, ``reject``, ``discard``).

``load(path)`` returns a ``SiteHeaderChecks`` and the notes about skipped lines, or raises
``SiteConfigError`` worded for the admin (``config`` adds the key's name).
"""

from __future__ import annotations

import configparser
import re
from pathlib import Path
from textwrap import dedent

from .core.snapshot import HeaderMatch, SiteHeaderChecks
from .core.verdict import Action

__all__ = ["SiteConfigError", "load", "parse_antispam", "JUMP_CHAINS"]

#: The chains ``jump_chain`` may name for policyd (Mailman's terminal chains).
JUMP_CHAINS = {"accept": Action.ACCEPT, "hold": Action.HOLD, "reject": Action.REJECT,
               "discard": Action.DISCARD}
# Mailman's other built-in chains: valid for Mailman, not something a decision at SMTP
# time can mirror.
_OTHER_CHAINS = ("default-owner-chain", "default-posting-chain", "dmarc", "header-match",
                 "moderation")
# lazr.config follows ``[meta] extends`` without a limit; a loop would never end.
_MAX_EXTENDS = 16


class SiteConfigError(Exception):
    """The file cannot be used (unreadable, not lazr.config syntax, a bad jump_chain)."""


def _read(path: Path, depth: int = 0) -> list[tuple[Path, configparser.RawConfigParser]]:
    """The parsed file and those it ``extends``, extender first (lazr.config's
    ``_getExtendedConfs``)."""
    if depth > _MAX_EXTENDS:
        raise SiteConfigError(f"more than {_MAX_EXTENDS} files deep in [meta] extends "
                              "(a loop?)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise SiteConfigError(f"{path}: not UTF-8 text ({error.reason} at byte "
                              f"{error.start})") from None
    except OSError as error:
        raise SiteConfigError(f"{path}: cannot read it: {error.strerror}") from None
    parser = configparser.RawConfigParser(strict=False)
    try:
        parser.read_string(dedent(text), source=str(path))
    except configparser.Error as error:
        raise SiteConfigError(f"{path}: not a Mailman configuration file: "
                              + str(error).replace("\n", " ")) from None
    found = [(path, parser)]
    if parser.has_option("meta", "extends"):
        base = (path.parent / parser.get("meta", "extends")).resolve()
        found += _read(base, depth + 1)
    return found


def parse_antispam(header_checks: str, jump_chain: str,
                   source: str = "") -> tuple[SiteHeaderChecks, list[str]]:
    """The ``[antispam]`` values as Mailman uses them, and a note per skipped line."""
    chain = jump_chain.strip()
    if chain not in JUMP_CHAINS:
        if chain in _OTHER_CHAINS:
            why = f"the {chain!r} chain cannot be mirrored at SMTP time"
        else:
            why = f"{chain!r} is no Mailman chain: Mailman would fail on every post"
        raise SiteConfigError(f"{source}: [antispam] jump_chain: {why} (allowed: "
                              f"{', '.join(JUMP_CHAINS)})")
    checks = []
    notes = []
    for index, line in enumerate(header_checks.splitlines()):
        if len(line.strip()) == 0:
            continue
        parts = line.split(":", 1)
        if len(parts) != 2:
            notes.append(f"{source}: [antispam] header_checks line {index} {line!r} has "
                         "no colon: Mailman skips it, so does policyd")
            continue
        header, pattern = parts[0], parts[1].lstrip()
        try:
            regex = re.compile(pattern, re.IGNORECASE)
        except re.error as error:
            regex = None
            notes.append(f"{source}: [antispam] header_checks line {index} {line!r}: "
                         f"the pattern does not compile ({error}): Mailman's rule never "
                         "matches, nor does policyd's")
        checks.append((index, HeaderMatch(header, pattern, regex, None)))
    return SiteHeaderChecks(tuple(checks), JUMP_CHAINS[chain], source, tuple(notes)), notes


def load(path: str | Path) -> tuple[SiteHeaderChecks, list[str]]:
    """Read Mailman's ``mailman.cfg`` at ``path``: its site header checks and the notes
    about lines Mailman (and policyd) skip."""
    path = Path(path)
    values = {"header_checks": "", "jump_chain": "hold"}
    # The extended files first, each overlaid by the one that extends it.
    for _, parser in reversed(_read(path)):
        if parser.has_section("antispam"):
            for key in values:
                if parser.has_option("antispam", key):
                    values[key] = parser.get("antispam", key)
    return parse_antispam(values["header_checks"], values["jump_chain"], str(path))
