"""Import Mailman 2.1 lists into the native store (``policyctl import-mailman2``).

Mailman 2.1 keeps each list in ``lists/NAME/config.pck``: a Python 2 ``cPickle`` of the
list's attribute dict (protocol 1; ``config.pck.last`` is the previous save, which Mailman
itself falls back to).  Those are read with ``safe_pickle.loads_mailman2`` (no code runs,
``Mailman`` classes become inert placeholders) and written into the native store as
``mode = mailman2`` lists, one transaction per list:

=====================================  ==============================================
Mailman 2.1 (``Defaults.py``/``Moderate.py``)  native store
=====================================  ==============================================
``NAME@host_name``                     the posting address; ``host_name`` the domain
``real_name``                          display name
``members`` + ``digest_members``       members (the value, when a string, is the
                                       address as typed)
Moderate bit (128) of ``user_options``  the member's action = ``member_moderation_action``
                                       (0 hold, 1 reject, 2 discard); other members:
                                       no action (Mailman 2 accepts them)
``generic_nonmember_action``           default nonmember action (0 accept, 1 hold,
                                       2 reject, 3 discard)
``accept/hold/reject/discard_these_nonmembers``  the four pattern lists, in order;
                                       ``^regex`` verbatim, ``@name`` -> ``@name@host`` of
                                       that list, plain addresses lower-cased
``emergency``                          emergency
``nonmember_rejection_notice``         rejection notice (one line: the SMTP reply)
``max_message_size``,                  the same columns, as Mailman 3's own importer
``max_num_recipients``,                (``mailman import21``, ``utilities/importer.py``)
``require_explicit_destination``,      copies them (sizes are KB in both; Mailman 2.1
``administrivia``,                     counts the body only, Mailman 3 the whole message)
``bounce_matching_headers``
``acceptable_aliases``                 one entry per non-blank line, ``^`` put in front
                                       (every Mailman 2.1 alias is a regular
                                       expression), plus ``^NAME@`` (2.1 takes the list
                                       name at any domain): as Mailman 3's importer
``header_filter_rules``                ``header_matches``, converted as Mailman 3's
                                       importer converts them (one entry per line of a
                                       rule; action defer -> none (jump_chain), reject,
                                       discard, accept, hold; approve, subscribe and
                                       unsubscribe rules are skipped with a warning)
``dmarc_moderation_action``,           ``dmarc_mitigate_action``, ``dmarc_addresses``
``dmarc_moderation_addresses``         (the ``dmarc-moderation`` rule: the address half
                                       of Mailman 2.1.34's check; ``@list`` skipped)
=====================================  ==============================================

Regular expressions are read as Python 2.7 reads them (``py2_regex``): a global flag
group past the start is moved to the front.  A list whose ``config.pck`` (and
``config.pck.last``) cannot be read is marked broken (``mark_broken``): its posts get a
temporary failure until an import reads it.

Running it again updates: members that left are removed, changed actions and settings
are updated, the pattern lists are replaced when they differ.  Each list records the
``lists`` directory it came from (``lists.mailman2_root``); an import of a whole ``lists``
directory removes the lists recorded there whose directory is gone (``bin/rmlist``), else
the daemon would go on answering for a list Mailman 2 no longer has (``reconcile``).  It
removes nothing when it cannot tell that a directory is gone: an unreadable or empty
``lists`` directory fails the whole import, a directory it cannot ``stat`` or one left
without ``config.pck`` keeps its list and is reported.  A list whose Mailman 2
data did not change is not written at all (no change-generation bump, so the daemon does
not rebuild for nothing).  Not imported, because Mailman 2 does not use them for posting
decisions or policyd has no equivalent: ``ban_list`` (subscription bans only),
``member_moderation_notice``, ``equivalent_domains`` (reported when set), passwords
(``mod_password`` is a SHA-1 hex digest no passlib context of Mailman 3 or policyd
verifies), digests, bounce data.  A setting missing from an old ``config.pck`` is left as
the store has it (with a warning).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from sqlalchemy import delete, func, insert, select, update

from ..core.addresses import normalise
from ..errors import BadInput, PolicydError
from ..core.verdict import Action, Mode
from .safe_pickle import UnsafePickleError, loads_mailman2

__all__ = ["import_path", "find_lists", "lists_dir", "read_list", "Mailman2List",
           "ImportFailed", "watch", "mark_broken", "reconcile", "py2_regex",
           "Py2RegexError"]

MODERATE = 128  # Mailman/Defaults.py: Moderate = 128
MEMBER_ACTIONS = {0: Action.HOLD, 1: Action.REJECT, 2: Action.DISCARD}
NONMEMBER_ACTIONS = {0: Action.ACCEPT, 1: Action.HOLD, 2: Action.REJECT, 3: Action.DISCARD}
# mailman/utilities/importer.py action_to_chain: Mailman 2.1's header_filter_rules
# actions (mm_cfg DEFER .. HOLD) as header_matches actions; defer is "no action"
# (jump_chain), approve/subscribe/unsubscribe have no equivalent.
FILTER_ACTIONS = {0: None, 2: Action.REJECT, 3: Action.DISCARD, 6: Action.ACCEPT,
                  7: Action.HOLD}
FILTER_ACTION_NAMES = {1: "approve", 4: "subscribe", 5: "unsubscribe"}
# The settings of Mailman 2.1's Hold handler that have native columns (the same names).
CONTENT_KEYS = ("max_message_size", "max_num_recipients", "require_explicit_destination",
                "administrivia", "bounce_matching_headers", "acceptable_aliases")
KINDS = (("accept_these_nonmembers", Action.ACCEPT), ("hold_these_nonmembers", Action.HOLD),
         ("reject_these_nonmembers", Action.REJECT),
         ("discard_these_nonmembers", Action.DISCARD))
PICKLES = ("config.pck", "config.pck.last")


class ImportFailed(PolicydError):
    """Some lists could not be imported (the others were)."""

    exit_code = 2


class _Unchanged(Exception):
    """Raised inside the write transaction to roll it back when nothing changed."""


# --- reading Mailman 2 ---------------------------------------------------------------------


def _text(value) -> str:
    """A Mailman 2 string: Python 2 ``str`` arrives as bytes (in the list's charset:
    UTF-8, else Latin-1), ``unicode`` as ``str``."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("latin-1")
    if isinstance(value, str):
        return value
    return str(value)


def _int(value, default: int = 0) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    return default


# --- Python 2's regular expressions -------------------------------------------------------
#
# Mailman 2.1 compiles its patterns with Python 2.7's ``re``, which takes a global inline
# flag group (``(?i)``, ``(?x)``, any of ``iLmsux``) anywhere in a pattern and applies it
# to the whole pattern (sre_parse: a flag group sets the pattern's flags; ``x`` found late
# makes it parse the whole pattern again, verbose).  Python 3.11 refuses such a group
# anywhere but at the start.  ``py2_regex`` moves them to the front, which is what Python 2
# meant; what Python 2 itself refuses (``(?i:...)``, ``(?-i)``, ``(?a)``, unknown
# extensions) stays refused, so the entry is skipped, as Mailman 2 skips it.

PY2_FLAGS = "iLmsux"
# Python 2.7's extensions after "(?" (sre_parse): anything else is an error there.
PY2_EXTENSIONS = (":", "P<", "P=", "=", "!", "<=", "<!", "#", "(")


class Py2RegexError(ValueError):
    """Python 2.7's ``re`` would refuse the pattern too."""


def _scan_py2(pattern: str, verbose: bool) -> tuple[str, str, bool]:
    """(global flags found, the pattern without its flag groups, whether it has a
    top-level ``|``).  Escapes, character classes, ``(?#...)`` comments and, ``verbose``,
    ``#`` comments are passed over as Python 2's parser passes over them."""
    out: list[str] = []
    flags = ""
    depth = 0
    alternation = False
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if c == "[":
            # A class: "]" first (after an optional "^") is a literal; escapes inside.
            j = i + 1
            if j < n and pattern[j] == "^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            if j >= n:
                raise Py2RegexError("unexpected end of regular expression (an open [)")
            out.append(pattern[i:j + 1])
            i = j + 1
            continue
        if verbose and c == "#":
            j = pattern.find("\n", i)
            j = n if j < 0 else j
            out.append(pattern[i:j])
            i = j
            continue
        if pattern.startswith("(?", i):
            rest = pattern[i + 2:]
            if rest.startswith("#"):
                j = pattern.find(")", i)
                if j < 0:
                    raise Py2RegexError("unbalanced parenthesis (an open (?#)")
                out.append(pattern[i:j + 1])
                i = j + 1
                continue
            if rest[:1] and rest[0] in PY2_FLAGS:
                k = 0
                while k < len(rest) and rest[k] in PY2_FLAGS:
                    k += 1
                if rest[k:k + 1] != ")":
                    # "(?i:...)", "(?i-s)": Python 3 syntax, an error in Python 2.
                    group = pattern[i:i + k + 3]
                    raise Py2RegexError(f"Python 2 has no scoped flags ({group!r})")
                flags += rest[:k]
                # Python 2's parser reads what follows (?x) verbose at once.
                verbose = verbose or "x" in rest[:k]
                i += k + 3
                continue
            if not rest.startswith(PY2_EXTENSIONS):
                raise Py2RegexError(f"unknown extension {pattern[i:i + 3]!r} in Python 2")
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            alternation = True
        out.append(c)
        i += 1
    return "".join(dict.fromkeys(flags)), "".join(out), alternation


def py2_regex(pattern: str, *, anchored: bool = False) -> tuple[str, list[str]]:
    """``pattern`` as Python 2.7 reads it, written for Python 3: its global flag groups
    moved to the front.  ``anchored``: the result must still start with ``^`` (a
    ``^regex`` entry of the native store), so the flags become a scoped group after it.
    Returns (pattern, notes); raises ``Py2RegexError`` for what Python 2 refuses.  A
    pattern without a flag group past its start is returned as it is."""
    flags, body, alternation = _scan_py2(pattern, verbose=False)
    if "x" in flags:
        # Python 2 parses the whole pattern again, verbose ("#" starts a comment), with
        # the flags the first parse found (a flag group now in a comment included).
        more, body, alternation = _scan_py2(pattern, verbose=True)
        flags = "".join(dict.fromkeys(flags + more))
    if not flags or ("L" not in flags and not anchored
                     and pattern == f"(?{flags})" + body):
        return pattern, []
    notes = []
    if "L" in flags:
        # Locale-dependent \w etc.: Python 3 has it only for bytes patterns.
        flags = flags.replace("L", "")
        notes.append("its (?L) flag (locale) is dropped: Python 3 has it only for bytes")
    if not flags:
        return body, notes
    if not anchored:
        return f"(?{flags})" + body, notes
    if not body.startswith("^"):
        body = "^" + body  # cannot happen for a "^regex" entry; keeps the store's form
    # Verbose: a "#" comment on the last line must not swallow the closing parentheses.
    end = "\n)" if "x" in flags else ")"
    if alternation:
        # "^a|b" is (^a)|(b): keep the whole pattern inside the group, searched from 0.
        return f"^(?{flags}:.*?(?:{body}{end})", notes
    return f"^(?{flags}:{body[1:]}{end}", notes


def _py2_entry(text: str, what: str, name: str, warnings: list[str],
               *, anchored: bool) -> str | None:
    """A regex entry translated by ``py2_regex``, or ``None`` (with a warning) when
    Python 2 refuses it too."""
    try:
        translated, notes = py2_regex(text, anchored=anchored)
    except Py2RegexError as error:
        warnings.append(f"{name}: {what} {text!r}: not a valid regular expression, for "
                        f"Mailman 2's Python 2.7 either ({error}); skipped")
        return None
    for note in notes:
        warnings.append(f"{name}: {what} {text!r}: {note}")
    return translated


@dataclass
class Mailman2List:
    """What policyd takes from one ``config.pck``."""

    name: str
    source: Path
    host_name: str
    display_name: str
    members: dict[str, tuple[str, Action | None]]  # lower-cased -> (as typed, action)
    emergency: bool
    default_nonmember_action: Action
    patterns: dict[Action, list[str]]
    rejection_notice: str | None
    warnings: list[str] = field(default_factory=list)
    # Native content settings (``queries.CONTENT_SETTINGS`` keys) taken from config.pck.
    content: dict = field(default_factory=dict)
    # The ``lists`` directory it was read from, absolute (``lists.mailman2_root``).
    root: str | None = None

    @property
    def posting_address(self) -> str:
        return f"{self.name}@{self.host_name}"


def lists_dir(path: Path) -> Path | None:
    """The ``lists`` directory ``path`` names (a Mailman prefix or ``lists`` itself), or
    ``None`` when ``path`` is one list's directory."""
    path = Path(path)
    if not path.is_dir():
        raise BadInput(f"{path}: not a directory")
    if any((path / name).exists() for name in PICKLES):
        return None
    return path / "lists" if (path / "lists").is_dir() else path


def _entries(base: Path) -> list[Path]:
    try:
        return sorted(base.iterdir())
    except OSError as error:
        # A lists directory that cannot be listed must not look like an empty one.
        raise BadInput(f"{base}: cannot list: {error.strerror}") from None


def _scan(path: Path) -> tuple[list[Path], dict[str, str]]:
    """(the list directories under ``path``, {name: error} of the directories whose
    pickles could not even be looked for: no search permission, an I/O error)."""
    base = lists_dir(path)
    if base is None:
        return [Path(path)], {}
    found, unsure = [], {}
    for entry in _entries(base):
        try:
            if entry.is_dir() and any((entry / name).exists() for name in PICKLES):
                found.append(entry)
        except OSError as error:
            unsure[entry.name.lower()] = f"{entry}: cannot look in it: {error.strerror}"
    if not found:
        raise BadInput(f"{path}: no Mailman 2 list (no */config.pck) found")
    return found, unsure


def find_lists(path: Path) -> list[Path]:
    """The list directories under ``path``: a Mailman prefix (``lists/`` inside), a
    ``lists`` directory, or one list directory."""
    return _scan(path)[0]


def load_config(directory: Path) -> tuple[dict, Path, list[str]]:
    """The list's attribute dict from ``config.pck``, else ``config.pck.last`` (Mailman's
    own order); returns (dict, file used, warnings)."""
    warnings: list[str] = []
    errors: list[str] = []
    for name in PICKLES:
        source = directory / name
        try:
            data = source.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as error:
            errors.append(f"{source}: cannot read: {error.strerror} (policyd must be in "
                          "Mailman's group to read config.pck)")
            continue
        try:
            config = loads_mailman2(data, encoding="bytes")
        except UnsafePickleError as error:
            errors.append(f"{source}: refused: {error}")
            continue
        if errors:
            warnings.extend(errors)
            warnings.append(f"{directory.name}: using {name}")
        return {_text(k): v for k, v in config.items()}, source, warnings
    raise BadInput("; ".join(errors) or f"{directory}: no config.pck or config.pck.last")


def read_list(directory: Path) -> Mailman2List:
    config, source, warnings = load_config(directory)
    name = directory.name.lower()
    internal = _text(config.get("_internal_name")).lower()
    if internal and internal != name:
        warnings.append(f"{name}: config.pck says its name is {internal!r}; using the "
                        "directory name, as Mailman does")
    host = _text(config.get("host_name")).strip().lower()
    if not host or normalise(f"{name}@{host}") is None:
        raise BadInput(f"{source}: bad list address {name}@{host}")
    member_action_code = _int(config.get("member_moderation_action"), 0)
    if member_action_code not in MEMBER_ACTIONS:
        raise BadInput(f"{source}: member_moderation_action {member_action_code!r} is not "
                       "0 (hold), 1 (reject) or 2 (discard)")
    nonmember_code = _int(config.get("generic_nonmember_action"), 1)
    if nonmember_code not in NONMEMBER_ACTIONS:
        raise BadInput(f"{source}: generic_nonmember_action {nonmember_code!r} is not "
                       "0 (accept), 1 (hold), 2 (reject) or 3 (discard)")
    options = {_text(k).lower(): _int(v) for k, v in
               (config.get("user_options") or {}).items()}
    members: dict[str, tuple[str, Action | None]] = {}
    for key in ("members", "digest_members"):
        for address, typed in (config.get(key) or {}).items():
            lower = _text(address).lower()
            original = _text(typed) if isinstance(typed, (bytes, str)) and typed else lower
            action = (MEMBER_ACTIONS[member_action_code]
                      if options.get(lower, 0) & MODERATE else None)
            members.setdefault(lower, (original, action))
    patterns: dict[Action, list[str]] = {}
    for attribute, kind in KINDS:
        entries = []
        for entry in config.get(attribute) or ():
            text = _text(entry).strip()
            if text.startswith("^"):
                text = _py2_entry(text, f"{attribute} entry", name, warnings,
                                  anchored=True)
            if text:
                entries.append(text)
        patterns[kind] = entries
    if config.get("equivalent_domains"):
        warnings.append(f"{name}: equivalent_domains is set; policyd does not apply it "
                        "(members must post from their subscribed address)")
    notice = _one_line(_text(config.get("nonmember_rejection_notice"))) or None
    return Mailman2List(
        name=name, source=source, host_name=host,
        display_name=_text(config.get("real_name")).strip() or name,
        members=members, emergency=bool(_int(config.get("emergency"), 0)),
        default_nonmember_action=NONMEMBER_ACTIONS[nonmember_code], patterns=patterns,
        rejection_notice=notice, warnings=warnings,
        content=_content(config, name, warnings), root=str(directory.parent.resolve()))


def _content(config: dict, name: str, warnings: list[str]) -> dict:
    """The Hold handler's settings and ``header_filter_rules``, as Mailman 3's importer
    (``import_config_pck``) converts them."""
    content: dict = {}
    for key in ("max_message_size", "max_num_recipients"):
        if key in config:
            number = _int(config[key], -1)
            if number < 0:
                warnings.append(f"{name}: {key} {config[key]!r} is not a size; not "
                                "imported")
                continue
            content[key] = number
    for key in ("require_explicit_destination", "administrivia"):
        if key in config:
            content[key] = bool(_int(config[key], 0))
    if "bounce_matching_headers" in config:
        content["bounce_matching_headers"] = _bounce_matching_headers(
            _text(config["bounce_matching_headers"]), name, warnings)
    if "acceptable_aliases" in config:
        aliases = config["acceptable_aliases"]
        lines = (_text(aliases).splitlines() if isinstance(aliases, (bytes, str))
                 else [_text(alias) for alias in aliases or ()])
        out = []
        for alias in lines:
            alias = alias.strip()
            if alias:
                alias = _py2_entry(alias if alias.startswith("^") else "^" + alias,
                                   "acceptable_aliases entry", name, warnings,
                                   anchored=True)
                if alias:
                    out.append(alias)
        # Mailman 2.1 takes the list's name as a local part at any domain.
        out.append(f"^{name}@")
        content["acceptable_aliases"] = list(dict.fromkeys(out))
    _dmarc(config, name, warnings, content)
    missing = [key for key in CONTENT_KEYS if key not in config]
    if missing:
        warnings.append(f"{name}: config.pck has no {', '.join(missing)} (an old "
                        "Mailman 2 list?); left as the store has it")
    if "header_filter_rules" in config:
        content["header_matches"] = _header_matches(config["header_filter_rules"] or (),
                                                    name, warnings)
    return content


def _dmarc(config: dict, name: str, warnings: list[str], content: dict) -> None:
    """``dmarc_moderation_action`` (0 accept, 1 munge, 2 wrap, 3 reject, 4 discard: the
    values of Mailman 3's DMARCMitigateAction), ``dmarc_moderation_addresses`` (Mailman
    2.1.34+) and ``dmarc_quarantine_moderation_action`` -> ``dmarc_mitigate_action``,
    ``dmarc_addresses`` and ``dmarc_quarantine``, which the ``dmarc-moderation`` rule of
    a ``mailman2``-mode list reads.  ``@list`` entries are left out: Mailman 2.1 ignores
    them here (``GetPattern`` without ``at_list``)."""
    if "dmarc_moderation_action" not in config:
        return
    code = _int(config["dmarc_moderation_action"], -1)
    if code not in range(5):
        value = config["dmarc_moderation_action"]
        warnings.append(f"{name}: dmarc_moderation_action {value!r} is not 0 .. 4; not "
                        "imported")
        return
    content["dmarc_mitigate_action"] = code
    if "dmarc_quarantine_moderation_action" in config:
        # Mailman 2.1 tests it for truth (a Yes/No setting, 1 or 0 in config.pck).
        content["dmarc_quarantine"] = bool(config["dmarc_quarantine_moderation_action"])
    entries = []
    for entry in config.get("dmarc_moderation_addresses") or ():
        text = _text(entry).strip()
        if not text:
            continue
        if text.startswith("@"):
            warnings.append(f"{name}: dmarc_moderation_addresses entry {text!r} names a "
                            "list; skipped (Mailman 2.1 ignores it there)")
            continue
        if text.startswith("^"):
            text = _py2_entry(text, "dmarc_moderation_addresses entry", name, warnings,
                              anchored=True)
            if text is None:
                continue
            try:
                re.compile(text)
            except re.error as error:
                warnings.append(f"{name}: dmarc_moderation_addresses entry {text!r}: not "
                                f"a valid regular expression ({error}); skipped")
                continue
        else:
            text = text.lower()
        entries.append(text)
    content["dmarc_addresses"] = list(dict.fromkeys(entries))
    if code >= 3:
        label = "reject" if code == 3 else "discard"
        warnings.append(f"{name}: dmarc_moderation_action is {label}: policyd applies it "
                        "at SMTP time (Exim's DATA ACL, with the message) to From: domains "
                        "whose DMARC record says so and to From: addresses in "
                        f"dmarc_moderation_addresses ({len(entries)}); Postfix, without "
                        "the message, gets only the addresses")


def _bounce_matching_headers(text: str, name: str, warnings: list[str]) -> str:
    """``bounce_matching_headers`` with each line's regex (after ``Header:``) as Python
    2 reads it (Mailman 2.1's Hold.parse_matching_header_opt); comments, blank lines
    and lines without a colon are kept as they are (the reader skips them)."""
    lines = []
    for line in text.splitlines():
        header, colon, value = line.partition(":")
        stripped = value.strip()
        if line.lstrip().startswith("#") or not colon or not stripped:
            lines.append(line)
            continue
        translated = _py2_entry(stripped, "bounce_matching_headers line", name, warnings,
                                anchored=False)
        if translated is not None:
            lines.append(f"{header}: {translated}")
    return "\n".join(lines) + ("\n" if text.endswith("\n") else "")


def _header_matches(rules, name: str, warnings: list[str]) -> list:
    """``header_filter_rules`` -> ``header_matches`` entries ``[header, pattern, action
    label or None]`` (``mailman/utilities/importer.py``, line for line)."""
    entries: list = []
    seen = set()
    for rule in rules:
        try:
            line_patterns, code = _text(rule[0]), _int(rule[1], -1)
        except (IndexError, TypeError):
            warnings.append(f"{name}: header_filter_rules entry {rule!r} is malformed; "
                            "skipped")
            continue
        if code not in FILTER_ACTIONS:
            what = FILTER_ACTION_NAMES.get(code, repr(code))
            warnings.append(f"{name}: header_filter_rules rule {line_patterns!r} with the "
                            f"{what} action has no header_matches equivalent; skipped "
                            "(as Mailman 3's importer skips it)")
            continue
        action = FILTER_ACTIONS[code]
        for line in line_patterns.splitlines():
            if len(line.strip()) == 0:
                continue
            # Python 2 applies a flag group anywhere to the whole line's pattern: split
            # it off first, put it back in front of the pattern part.
            translated = _py2_entry(line, "header_filter_rules line", name, warnings,
                                    anchored=False)
            if translated is None:
                continue
            flag_group = re.match(r"\(\?[iLmsux]+\)", translated)
            prefix = flag_group.group(0) if flag_group else ""
            line = translated[len(prefix):]
            for sep in (": ", ":.*", ":.", ":"):
                header, sep, pattern = line.partition(sep)
                if sep:
                    break
            else:
                warnings.append(f"{name}: header_filter_rules line {line!r} names no "
                                "header; skipped (Mailman 3 cannot match any header)")
                continue
            header = header.strip().lstrip("^").lower().replace("\\", "")
            if not header:
                warnings.append(f"{name}: header_filter_rules line {line!r}: cannot "
                                "parse the header; skipped")
                continue
            if len(pattern) == 0:
                pattern = ".*"
            pattern = prefix + pattern
            try:
                re.compile(pattern)
            except re.error:
                warnings.append(f"{name}: header_filter_rules line {line!r}: not a valid "
                                "regular expression; skipped")
                continue
            if (header, pattern) in seen:
                continue
            seen.add((header, pattern))
            entries.append([header, pattern, None if action is None else action.label])
    return entries


# --- writing the native store -------------------------------------------------------------


@dataclass
class ListReport:
    address: str
    source: str
    created: bool = False
    added: int = 0
    removed: int = 0
    changed: int = 0
    settings: list[str] = field(default_factory=list)
    patterns: bool = False
    warnings: list[str] = field(default_factory=list)
    # The list was marked broken (its config.pck could not be read) and is read again.
    recovered: bool = False
    # The ``lists`` directory it is now recorded as imported from, when that changed.
    root: str | None = None
    # The list was removed from the store: its directory is gone (``reconcile``).
    deleted: bool = False

    @property
    def unchanged(self) -> bool:
        return not (self.created or self.added or self.removed or self.changed
                    or self.settings or self.patterns or self.recovered or self.root
                    or self.deleted)

    def line(self) -> str:
        if self.unchanged:
            return f"{self.address}: unchanged ({self.source})"
        if self.deleted:
            return (f"{self.address}: removed, with its {self.removed} members: "
                    f"{self.source} is gone (rmlist)")
        parts = ["created"] if self.created else []
        if self.recovered:
            parts.append("read again, no longer a temporary failure")
        if self.added:
            parts.append(f"+{self.added} members")
        if self.removed:
            parts.append(f"-{self.removed} members")
        if self.changed:
            parts.append(f"{self.changed} moderation changes")
        if self.settings and not self.created:
            parts.append("settings: " + ", ".join(self.settings))
        if self.patterns and not self.created:
            parts.append("nonmember patterns replaced")
        if self.root and not self.created:
            parts.append(f"now recorded as from {self.root}")
        return f"{self.address}: {', '.join(parts)} ({self.source})"


def _one_line(text: str | None) -> str:
    """Whitespace (newlines included) collapsed, control characters dropped: the form the
    native store keeps display names and SMTP rejection texts in."""
    return " ".join("".join(ch for ch in (text or "") if ch >= " " or ch in "\t\n\r"
                            ).split())


def _patterns_for(mm2: Mailman2List, at_lists: dict[str, str], report: ListReport,
                  check_pattern) -> list[tuple[Action, int, str]]:
    rows = []
    for kind, entries in mm2.patterns.items():
        seen = set()
        for entry in entries:
            text = entry
            if entry.startswith("@"):
                # Mailman 2: "@name" is another list of this installation, by name.
                target = at_lists.get(entry[1:].strip().lower())
                if target is None:
                    report.warnings.append(f"{mm2.name}: {kind.label}_these_nonmembers "
                                           f"entry {entry!r} names no imported list; "
                                           "skipped (Mailman 2 skips it too)")
                    continue
                if target == mm2.posting_address:
                    report.warnings.append(f"{mm2.name}: {entry!r} refers to the list "
                                           "itself; skipped (Mailman 2 skips it too)")
                    continue
                text = "@" + target
            try:
                checked = check_pattern(text)
            except BadInput as error:
                report.warnings.append(f"{mm2.name}: {kind.label}_these_nonmembers entry "
                                       f"{entry!r} skipped: {error}")
                continue
            stripped = text.strip()
            if stripped.endswith(".") and not stripped.startswith(("^", "@")):
                # Mailman 2.1 looks the lower-cased sender up among the entries as written
                # (List2Dict, foldcase): "pat@example.com." meets only the sender written
                # with the dot (docs/mailman2.md); the stored entry keeps it.
                checked = stripped.lower()
            text = checked
            if text in seen:
                continue
            seen.add(text)
            rows.append((kind, len(seen), text))
    return rows


def _sync_list(session, mm2: Mailman2List, at_lists: dict[str, str]) -> ListReport:
    from . import queries as q
    from .models import Address, Membership, MemberRole, MailingList, NonmemberPattern

    report = ListReport(mm2.posting_address, mm2.source.name, warnings=list(mm2.warnings))
    settings = dict(display_name=_one_line(mm2.display_name)[:255] or mm2.name.capitalize(),
                    mode=Mode.MAILMAN2,
                    emergency=mm2.emergency, default_member_action=Action.ACCEPT,
                    default_nonmember_action=mm2.default_nonmember_action,
                    rejection_notice=mm2.rejection_notice)
    row = session.scalar(select(MailingList).where(
        MailingList.posting_address == mm2.posting_address))
    if row is None:
        row, _ = q.add_list(session, mm2.posting_address, **settings)
        report.created = True
        if mm2.content:
            q.set_list(session, mm2.posting_address, **mm2.content)
    else:
        if row.broken is not None:
            row.broken = None
            report.recovered = True
        if row.mailman2_root is not None and row.mailman2_root != mm2.root:
            report.warnings.append(
                f"{mm2.name}: {mm2.posting_address} was imported from "
                f"{row.mailman2_root}; now from {mm2.root} (two Mailman 2 installations "
                "with the same list?): an import of the first no longer removes it")
        report.settings = [key for key in settings if getattr(row, key) != settings[key]]
        changed = [key for key, value in mm2.content.items()
                   if getattr(row, key) != q._content_value(key, value)]
        if report.settings or changed:
            q.set_list(session, mm2.posting_address,
                       **{key: settings[key] if key != "rejection_notice"
                          else (settings[key] or "") for key in report.settings},
                       **{key: mm2.content[key] for key in changed})
        report.settings += changed
    if row.mailman2_root != mm2.root:
        row.mailman2_root = mm2.root
        report.root = None if report.created else mm2.root

    # The stand-ins made at other hosts while config.pck could not be read (``mark_broken``):
    # broken, no members; the list lives at its real address now.
    for other in session.scalars(select(MailingList).where(
            MailingList.list_name == mm2.name, MailingList.mode == Mode.MAILMAN2,
            MailingList.posting_address != mm2.posting_address,
            MailingList.broken.is_not(None))).all():
        if session.scalar(select(Membership.id).where(Membership.list_id == other.id)
                          .limit(1)) is None:
            q.remove_list(session, other.posting_address)
            report.warnings.append(f"{mm2.name}: removed {other.posting_address}, the "
                                   "stand-in made while its config.pck could not be read")

    # Members: Mailman 2 has only direct memberships.
    wanted: dict[str, tuple[str, Action | None]] = {}
    for lower, (original, action) in mm2.members.items():
        try:
            email, typed = q.parse_address(original)
        except BadInput as error:
            report.warnings.append(f"{mm2.name}: member {lower!r} skipped: {error}")
            continue
        wanted.setdefault(email, (typed, action))
    current: dict[str, tuple[int, Action | None]] = {
        email: (id_, None if action is None else Action(action))
        for id_, email, action in session.execute(
            select(Membership.id, Address.email, Membership.moderation_action)
            .join(Address, Address.id == Membership.address_id)
            .where(Membership.list_id == row.id, Membership.role == MemberRole.MEMBER))}
    user_memberships = session.scalars(select(Membership.id).where(
        Membership.list_id == row.id, Membership.role == MemberRole.MEMBER,
        Membership.user_id.is_not(None))).all()
    gone = [id_ for email, (id_, _) in current.items() if email not in wanted]
    gone += list(user_memberships)
    for chunk in q.chunks(list(gone), 500):
        session.execute(delete(Membership).where(Membership.id.in_(chunk)))
    report.removed = len(gone)
    new = [q.Entry(email, typed, action) for email, (typed, action) in wanted.items()
           if email not in current]
    if new:
        added, _ = q.add_members(session, row, new)
        report.added = len(added)
    by_action: dict[Action | None, list[int]] = {}
    for email, (typed, action) in wanted.items():
        if email in current and current[email][1] != action:
            by_action.setdefault(action, []).append(current[email][0])
    for action, ids in by_action.items():
        for chunk in q.chunks(list(ids), 500):
            session.execute(update(Membership).where(Membership.id.in_(chunk))
                            .values(moderation_action=action))
        report.changed += len(ids)

    # The four nonmember lists, replaced as a whole when they differ.
    wanted_patterns = _patterns_for(mm2, at_lists, report, q.check_pattern)
    have = [(Action(kind), position, text) for kind, position, text in session.execute(
        select(NonmemberPattern.kind, NonmemberPattern.position, NonmemberPattern.pattern)
        .where(NonmemberPattern.list_id == row.id)
        .order_by(NonmemberPattern.kind, NonmemberPattern.position))]
    if sorted(have) != sorted(wanted_patterns):
        session.execute(delete(NonmemberPattern).where(NonmemberPattern.list_id == row.id))
        if wanted_patterns:
            session.execute(insert(NonmemberPattern), [
                {"list_id": row.id, "kind": kind, "position": position, "pattern": text}
                for kind, position, text in wanted_patterns])
        report.patterns = True
    return report


def import_lists(store, lists: Iterable[Mailman2List]) -> ImportResult:
    """Write each list in its own transaction; a list whose data did not change is
    rolled back (nothing written, no generation bump)."""
    from .models import MailingList

    lists = list(lists)
    at_lists = {mm2.name: mm2.posting_address for mm2 in lists}
    with store.read() as session:
        for name, posting in session.execute(
                select(MailingList.list_name, MailingList.posting_address)
                .where(MailingList.mode == Mode.MAILMAN2)):
            at_lists.setdefault(name, posting)
    result = ImportResult([], [])
    for mm2 in lists:
        holder: list[ListReport] = []
        try:
            with store.write() as session:
                report = _sync_list(session, mm2, at_lists)
                holder.append(report)
                if report.unchanged:
                    raise _Unchanged()
        except _Unchanged:
            pass
        except PolicydError as error:
            result.failures.append(f"{mm2.name}: {error}")
            continue
        result.reports.append(holder[0])
    return result


@dataclass
class ImportResult:
    reports: list[ListReport]
    failures: list[str]
    # What the import left alone and the administrator may want to act on (not a failure).
    notes: list[str] = field(default_factory=list)


def mark_broken(store, name: str, reason: str, hosts: Iterable[str],
                root: str | None = None) -> list[str]:
    """Fail closed for the Mailman 2 list ``name`` whose config.pck cannot be read: set
    ``broken`` on its rows (the ``broken-list`` rule answers its posts with a temporary
    failure, never from rows that may be stale).  A list not in the store yet (its
    host is in the unreadable pickle) gets a stand-in, no members, at each of ``hosts``
    and each host of the store's Mailman 2 lists, where no list has that address: a post
    to it is retried, not refused as "no such list"; a stand-in records ``root`` (its
    ``lists`` directory), so that it goes with an ``rmlist``.  Returns the addresses
    marked."""
    from . import queries as q
    from .models import Domain, MailingList

    hosts = set(hosts)
    marked: list[str] = []
    try:
        with store.write() as session:
            rows = list(session.scalars(select(MailingList).where(
                MailingList.list_name == name, MailingList.mode == Mode.MAILMAN2)))
            if not rows:
                known = set(hosts) | set(session.scalars(
                    select(Domain.name).join(MailingList, MailingList.domain_id == Domain.id)
                    .where(MailingList.mode == Mode.MAILMAN2)))
                for host in sorted(known):
                    try:
                        # A host of this run's lists gets its domain now, as the import
                        # of those lists would.
                        row, _ = q.add_list(session, f"{name}@{host}", mode=Mode.MAILMAN2,
                                            create_domain=host in hosts)
                    except PolicydError:
                        continue  # taken by another list, or not a usable address
                    row.mailman2_root = root
                    rows.append(row)
            changed = False
            for row in rows:
                marked.append(row.posting_address)
                if row.broken != reason:
                    row.broken = reason
                    changed = True
            if not changed:
                raise _Unchanged()
    except _Unchanged:
        pass
    return marked


def reconcile(store, root: Path, found: Iterable[str]) -> ImportResult:
    """Remove the ``mailman2``-mode lists recorded as imported from the ``lists``
    directory ``root`` whose ``NAME`` directory is gone (Mailman 2's ``rmlist``);
    ``found`` are the names of the list directories the import found there.  Only a
    directory that ``stat`` says does not exist counts as gone: one that cannot be
    checked, or that is there without ``config.pck`` (``rmlist`` under way, a restore
    half done), keeps its list, reported as a failure, so that the next run (``--watch``:
    the next interval) decides again.  Mailman 2-mode lists with no recorded directory
    (imported before policyd recorded it, or made with ``policyctl list add``) and
    without a directory under ``root`` are left alone, with a note.  Each removal is its
    own transaction, made only if the row is still the one read."""
    from . import queries as q
    from .models import MailingList, Membership

    root = Path(root)
    where = str(root.resolve())
    found = set(found)
    result = ImportResult([], [])
    with store.read() as session:
        rows = session.execute(
            select(MailingList.id, MailingList.list_name, MailingList.posting_address,
                   MailingList.mailman2_root)
            .where(MailingList.mode == Mode.MAILMAN2,
                   (MailingList.mailman2_root == where)
                   | MailingList.mailman2_root.is_(None))
            .order_by(MailingList.posting_address)).all()
    for id_, name, address, recorded in rows:
        if name in found:
            continue
        directory = root / name
        try:
            os.lstat(directory)
        except FileNotFoundError:
            gone = True
        except OSError as error:
            result.failures.append(f"{name}: cannot check {directory}: {error.strerror}; "
                                   f"{address} kept as it was")
            continue
        else:
            gone = False
        if recorded is None:
            if gone:
                result.notes.append(
                    f"{address}: a mailman2-mode list with no recorded Mailman 2 "
                    f"directory (imported before policyd recorded it, or made with "
                    f"policyctl list add) and none in {where}: left as it is; if Mailman "
                    f"2 no longer has it: policyctl list remove {address}")
            continue
        if not gone:
            result.failures.append(f"{name}: {directory} has no config.pck or "
                                   f"config.pck.last; {address} kept as it was")
            continue
        report = ListReport(address, str(directory), deleted=True)
        try:
            with store.write() as session:
                row = session.scalar(select(MailingList).where(
                    MailingList.id == id_, MailingList.mode == Mode.MAILMAN2,
                    MailingList.mailman2_root == where))
                if row is None:
                    raise _Unchanged()  # changed meanwhile (policyctl list set --mode)
                report.removed = session.scalar(
                    select(func.count()).select_from(Membership)
                    .where(Membership.list_id == id_))
                q.remove_list(session, address)
        except _Unchanged:
            continue
        except PolicydError as error:
            result.failures.append(f"{name}: {directory} is gone, but {address} could "
                                   f"not be removed: {error}")
            continue
        result.reports.append(report)
    return result


def import_path(store, path: Path) -> ImportResult:
    """Import every list under ``path``.  A list that cannot be read or written is
    reported and the others are still imported; one that cannot be read is marked
    broken (``mark_broken``) until an import reads it.  When ``path`` is a whole
    ``lists`` directory (or the prefix holding it), the lists imported from there before
    whose directory is gone are removed (``reconcile``)."""
    from .models import MailingList

    path = Path(path)
    lists, failures, unreadable = [], [], []
    directories, unsure = _scan(path)
    base = lists_dir(path)
    root = str(directories[0].parent.resolve())
    for directory in directories:
        try:
            lists.append(read_list(directory))
        except BadInput as error:
            unreadable.append((directory.name.lower(), str(error)))
    if unsure:
        # A known list whose directory cannot be searched fails closed, as one whose
        # config.pck cannot be read; another such directory (lost+found) is not a list.
        with store.read() as session:
            known = set(session.scalars(select(MailingList.list_name).where(
                MailingList.mode == Mode.MAILMAN2,
                MailingList.list_name.in_(list(unsure)))))
        unreadable += [(name, error) for name, error in unsure.items() if name in known]
    # The stand-ins first, so that an ``@name`` entry of another list meets the same
    # lists on this run as on the next.
    hosts = {mm2.host_name for mm2 in lists}
    for name, error in unreadable:
        try:
            marked = mark_broken(store, name, f"Mailman 2 import: {error}", hosts, root)
        except PolicydError as store_error:
            failures.append(f"{name}: {error}; and it could not be marked broken: "
                            f"{store_error}")
            continue
        if marked:
            failures.append(f"{name}: {error}; posts to {', '.join(marked)} get a "
                            "temporary failure until it is read")
        else:
            failures.append(f"{name}: {error}; not in the store and its host is unknown: "
                            "not served")
    # Before the import, so that an ``@name`` entry naming a removed list is skipped,
    # as Mailman 2 skips it.
    removed = (reconcile(store, base, [d.name.lower() for d in directories] + list(unsure))
               if base is not None else ImportResult([], []))
    result = import_lists(store, lists) if lists else ImportResult([], [])
    result.reports[:0] = removed.reports
    result.failures[:0] = failures + removed.failures
    result.notes[:0] = removed.notes
    return result


# --- --watch -----------------------------------------------------------------------------


def _fingerprint(path: Path) -> tuple:
    """mtime, size and inode of every list's pickles: Mailman 2 saves by writing a new
    file and renaming it over config.pck, which changes all three; and ctime and mode, so
    that a permission fixed (``chmod``) counts as a change too."""
    out = []
    for directory in find_lists(path):
        for name in PICKLES:
            try:
                st = (directory / name).stat()
            except OSError:
                continue
            out.append((str(directory / name), st.st_mtime_ns, st.st_size, st.st_ino,
                        st.st_ctime_ns, st.st_mode))
    return tuple(out)


def watch(store, path: Path, interval: float, report: Callable[[ImportResult], None],
          *, sleep: Callable[[float], None] = time.sleep,
          rounds: int | None = None) -> None:
    """Import now, then again whenever a list's config.pck changes or a list directory
    comes or goes (polled every ``interval`` seconds), and every interval while an
    import failed (a list that could not be read is retried until it is).  A failure
    (or a note) is reported once, when it starts (or its message changes), not every
    interval; a retry that changes nothing reports nothing.  ``rounds`` bounds the loop
    (tests)."""
    seen = None
    failing: set[str] = set()  # the failures already reported, still going on
    noted: set[str] = set()  # the same, for notes
    count = 0
    while rounds is None or count < rounds:
        count += 1
        result = None
        retry = False
        try:
            fingerprint = _fingerprint(path)
            if fingerprint != seen or failing:
                retry = fingerprint == seen
                result = import_path(store, path)
                seen = fingerprint
        except PolicydError as error:
            result = ImportResult([], [str(error)])
        if result is not None:
            new = [failure for failure in result.failures if failure not in failing]
            failing = set(result.failures)
            notes = [note for note in result.notes if note not in noted]
            noted = set(result.notes)
            reports = [r for r in result.reports if not (retry and r.unchanged)]
            if not retry or reports or new or notes:
                report(ImportResult(reports, new, notes))
        if rounds is None or count < rounds:
            sleep(interval)
