"""The immutable in-memory view of the store that every decision reads (pure).

A loader (native store, Mailman 3 database) builds plain ``ListSpec`` values; ``build``
turns them into a ``Snapshot``: dicts keyed by normalised address, regular expressions
compiled once, ``@list`` references resolved to the other list's member set.  Nothing here
does I/O; the reactor only ever holds a reference to a finished ``Snapshot``.

One list whose rows cannot be read does not fail the build.  A loader marks it with
``ListSpec.broken`` (the reason: an unloadable pickle, an unknown action value), and a
list that ``build_list`` cannot build is marked the same way; its ``ListPolicy`` keeps only
its addresses and ``broken``, the ``broken-list`` rule answers its posts with a temporary
failure, and ``Snapshot.broken`` lists them (posting address -> reason) for the log and
``status`` (not ``problems``: the service logs a broken list once, when it breaks).  A
bad regular expression is not that: Mailman skips it and so do we (it is reported in
``problems``).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, ClassVar, Iterable, Mapping, NamedTuple

from .addresses import CACHED_MAX, canonical, normalise, split_address
from .verdict import Action, Mode, Role
from .moderation import SmtpModeration

# Mailman 3 LMTP's suffixes (mailman/runners/lmtp.py SUBADDRESS_NAMES), plus "subscribe"
# and "unsubscribe" that Mailman 2's aliases had.
SUFFIXES: Mapping[str, Role] = {
    "bounces": Role.BOUNCES,
    "confirm": Role.CONFIRM,
    "join": Role.JOIN,
    "leave": Role.LEAVE,
    "owner": Role.OWNER,
    "request": Role.REQUEST,
    "subscribe": Role.SUBSCRIBE,
    "unsubscribe": Role.UNSUBSCRIBE,
}


@dataclass(frozen=True, slots=True)
class MemberSpec:
    """One membership as a loader sees it: an address and its moderation action."""

    address: str
    action: Action | None = None


@dataclass(frozen=True)
class ListSpec:
    """Everything the decision needs about one list, as plain loader output."""

    posting_address: str
    mode: Mode = Mode.MAILMAN3
    list_id: str | None = None
    display_name: str | None = None
    emergency: bool = False
    default_member_action: Action = Action.DEFER
    default_nonmember_action: Action = Action.HOLD
    rejection_notice: str | None = None
    # Either MemberSpecs or, from bulk loaders, a dict address -> own action (no object
    # per membership: less memory and less to free after a build).
    members: tuple[MemberSpec, ...] | Mapping[str, Action | None] = ()
    # Other addresses of the users behind members: address -> the member address it
    # stands for (Mailman 3's "through another address of the same user").
    user_aliases: Mapping[str, str] = field(default_factory=dict)
    nonmembers: tuple[MemberSpec, ...] | Mapping[str, Action | None] = ()
    accept_these_nonmembers: tuple[str, ...] = ()
    hold_these_nonmembers: tuple[str, ...] = ()
    reject_these_nonmembers: tuple[str, ...] = ()
    discard_these_nonmembers: tuple[str, ...] = ()
    bans: tuple[str, ...] = ()
    # Why this list's rows could not be read (then only its addresses are meaningful):
    # the list is answered with a temporary failure, every other list as usual.
    broken: str | None = None
    # What the rules that read the message need (Mailman 3's columns of the same names;
    # the defaults are "off", not Mailman's defaults for a new list: a loader says what
    # the list has).  ``moderator_password`` is the passlib hash, never the password.
    moderator_password: str | None = field(default=None, repr=False)
    # (header, pattern, action): ``None`` is Mailman's ``[antispam] jump_chain`` (hold).
    header_matches: tuple[tuple[str, str, Action | None], ...] = ()
    max_message_size: int = 0
    max_num_recipients: int = 0
    require_explicit_destination: bool = False
    acceptable_aliases: tuple[str, ...] = ()
    administrivia: bool = False
    bounce_matching_headers: str = ""
    newsgroup_moderated: bool = False
    # SMTP-time moderation of nonmember posts (``core.moderation``): off, greylist or
    # moderate, as text or ``SmtpModeration``.
    smtp_moderation: str = "off"
    # DMARC mitigation (``core.dmarc``): Mailman's DMARCMitigateAction value (0 no
    # mitigation .. 4 discard), its unconditionally flag, and its dmarc_addresses.
    dmarc_mitigate_action: int = 0
    dmarc_mitigate_unconditionally: bool = False
    dmarc_addresses: tuple[str, ...] = ()
    # Mailman 2's dmarc_quarantine_moderation_action: whether p=quarantine counts as
    # p=reject does (Mailman 3 always counts it; a mailman2-mode list reads this).
    dmarc_quarantine: bool = True


@dataclass(frozen=True, slots=True)
class Pattern:
    """One ``*_these_nonmembers`` or ban entry: exact address, ``^regex`` or ``@list``."""

    text: str
    exact: str | None = None
    regex: re.Pattern | None = None
    at_list: str | None = None


@dataclass(frozen=True, slots=True)
class BanList:
    exact: frozenset[str] = frozenset()
    patterns: tuple[Pattern, ...] = ()
    # ``^`` entries that do not compile.  Unlike a ``*_these_nonmembers`` entry, Mailman
    # does not skip one: ``BanManager.is_banned`` calls ``re.match`` on it unguarded, so
    # a post whose sender is not banned exactly fails in ``banned-address`` (shunted).
    invalid: tuple[str, ...] = ()

    def match(self, address: str) -> str | None:
        """Return the ban entry that bans ``address`` (Mailman: exact, or ``re.match``
        with IGNORECASE for ``^`` entries), else ``None``."""
        if address in self.exact:
            return address
        return self.match_pattern(address)

    def match_pattern(self, address: str) -> str | None:
        """The ``^`` entry that bans ``address``, else ``None``."""
        for pattern in self.patterns:
            if pattern.regex.match(address):
                return pattern.text
        return None


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """One of a list's ``header_matches`` (or a site ``header_checks`` line): a compiled
    pattern and the action it jumps to, ``None`` for Mailman's ``[antispam] jump_chain``
    (``regex`` is ``None`` for a pattern that does not compile: Mailman's rule then
    misses)."""

    header: str
    pattern: str
    regex: re.Pattern | None
    action: Action | None


@dataclass(frozen=True, slots=True)
class SiteHeaderChecks:
    """Mailman's ``[antispam]`` section (``policyd.mailman_site`` reads it): the
    ``header_checks`` lines, in order (``line``: their index in the value, as Mailman
    names its rules ``header-match-config-<line>``), and ``jump_chain``, the action of a
    site match and of every list ``header_matches`` entry without its own.  ``notes``:
    the lines Mailman skips (and policyd with it), reported in ``Snapshot.problems``."""

    checks: tuple[tuple[int, HeaderMatch], ...] = ()
    jump_chain: Action = Action.HOLD
    source: str = ""
    notes: tuple[str, ...] = ()


NO_SITE_CHECKS = SiteHeaderChecks()


@dataclass(frozen=True, slots=True)
class ContentPolicy:
    """The settings of the rules that read the message (see ``ListSpec``)."""

    moderator_password: str | None = field(default=None, repr=False)
    header_matches: tuple[HeaderMatch, ...] = ()
    max_message_size: int = 0
    max_num_recipients: int = 0
    require_explicit_destination: bool = False
    acceptable_aliases: tuple[str, ...] = ()
    administrivia: bool = False
    # (header name, compiled regex) from ``bounce_matching_headers``, as Mailman parses it.
    bounce_matching_headers: tuple[tuple[str, re.Pattern], ...] = ()
    newsgroup_moderated: bool = False
    # ``core.dmarc``: a ``DmarcAction`` value, Mailman's flag, and dmarc_addresses.
    dmarc_mitigate_action: int = 0
    dmarc_mitigate_unconditionally: bool = False
    dmarc_addresses: tuple[str, ...] = ()
    # Mailman 2: p=quarantine mitigated too (dmarc_quarantine_moderation_action).
    dmarc_quarantine: bool = True


NO_CONTENT = ContentPolicy()


@dataclass(frozen=True, slots=True)
class ListPolicy:
    posting_address: str
    list_id: str
    display_name: str
    mode: Mode
    emergency: bool
    default_member_action: Action
    default_nonmember_action: Action
    rejection_notice: str | None
    # All member addresses (as the keys of a dict whose values are all None), and the
    # actions of the few members that have their own.  Not a frozenset: a dict holding
    # only strings and None is not tracked by the cyclic garbage collector, so a
    # million memberships add nothing to every full collection (a set is always tracked,
    # and traversing them all took ~50 ms, a reactor stall each time); it is also smaller.
    # Treated as read-only like everything else here.
    members: dict[str, None]
    member_actions: Mapping[str, Action]
    member_aliases: Mapping[str, str]
    nonmembers: Mapping[str, Action | None]
    nonmember_patterns: tuple[tuple[Action, tuple[Pattern, ...]], ...]
    bans: BanList
    # Set when the list's rows could not be read: the reason (see the module docstring).
    broken: str | None = None
    content: ContentPolicy = NO_CONTENT
    smtp_moderation: SmtpModeration = SmtpModeration.OFF
    # What other modules derive from this list once and reuse for every query to it
    # (``core.chain``: the list's chain on the MTA path).  Not part of the list's value:
    # never compared, never copied by ``dataclasses.replace``.
    derived: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def find_member(self, address: str) -> tuple[str, Action | None] | None:
        """The member ``address`` posts as (itself, or another address of its user)."""
        if address in self.members:
            return address, self.member_actions.get(address)
        alias = self.member_aliases.get(address)
        if alias is not None:
            return alias, self.member_actions.get(alias)
        return None


class Target(NamedTuple):
    """What a recipient address resolved to (a tuple: one is made per query)."""

    list: ListPolicy | None
    role: Role | None
    managed_domain: bool
    address: str | None


@dataclass(frozen=True)
class Snapshot:
    lists: Mapping[str, ListPolicy]
    domains: Mapping[str, str]
    site_bans: BanList
    version: str = ""
    built_at: float = 0.0
    problems: tuple[str, ...] = ()
    # Backend-private bookkeeping for incremental refreshes (per-list digests); the
    # decision never reads it.
    source_state: object = field(default=None, compare=False, repr=False)
    # The lists served as a temporary failure: posting address -> why (``ListSpec.broken``).
    broken: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # Mailman's site ``[antispam] header_checks`` and ``jump_chain`` (configuration, not
    # store data: ``[mailman] config_file``).
    site_header_checks: SiteHeaderChecks = NO_SITE_CHECKS
    # How the refresh that made it went ("incremental: 1 list read again", "full build:
    # shared data changed"), for the log line and the status; empty for a plain build.
    built_how: str = field(default="", compare=False)
    # Why this snapshot may not be one moment of the store (a read that straddled
    # commits): logged when it is loaded; empty for a consistent read.
    caveat: str = field(default="", compare=False)
    # Recipient -> Target, filled as queries come: MTAs ask about the same few list
    # addresses all day.  Bounded in entries and in their keys' length (``CACHED_MAX``),
    # since a recipient is whatever the client typed.
    _targets: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    RESOLVED_MAX: ClassVar[int] = 16384

    @property
    def membership_count(self) -> int:
        return sum(len(policy.members) for policy in self.lists.values())

    def resolve(self, recipient: str) -> Target:
        """Map a recipient as the MTA saw it to a list and the role of that address.

        Like Mailman 3's LMTP runner: lower-case, map an alias domain to the list's mail
        host, drop a ``+tag``, then try the exact list name before a ``-suffix``.
        """
        target = self._targets.get(recipient)
        if target is None:
            if len(recipient) > CACHED_MAX:  # an entry costs its key: resolved each time
                return self._resolve(recipient)
            if len(self._targets) >= self.RESOLVED_MAX:
                self._targets.clear()
            target = self._targets[recipient] = self._resolve(recipient)
        return target

    def _resolve(self, recipient: str) -> Target:
        address = normalise(recipient)
        if address is None:
            return Target(None, None, False, None)
        local, domain = split_address(address)
        mail_host = self.domains.get(domain)
        if mail_host is None:
            return Target(None, None, False, address)
        local = local.split("+", 1)[0]
        policy = self.lists.get(f"{local}@{mail_host}")
        if policy is not None:
            return Target(policy, Role.POST, True, address)
        base, dash, suffix = local.rpartition("-")
        if dash and suffix in SUFFIXES:
            policy = self.lists.get(f"{base}@{mail_host}")
            if policy is not None:
                return Target(policy, SUFFIXES[suffix], True, address)
        elif dash and suffix == "admin":
            # Mailman 2.1 makes LIST-admin too (MTA/Utils.py, makealiases): its old name of
            # LIST-bounces, handled by the bounce processor.  Mailman 3 has none.
            policy = self.lists.get(f"{base}@{mail_host}")
            if policy is not None and policy.mode is Mode.MAILMAN2:
                return Target(policy, Role.BOUNCES, True, address)
        return Target(None, None, True, address)


def compile_pattern(text: str, mode: Mode, *, ban: bool = False) -> Pattern | None:
    """Compile one entry the way the list's Mailman version would read it.

    Mailman 3 ``*_these_nonmembers``: ``re.match`` case-sensitive; Mailman 2: ``re.search``
    case-insensitive; bans (Mailman 3): ``re.match`` case-insensitive.  Returns ``None``
    for a regex that does not compile (Mailman logs and skips those too).

    Mailman 3 compares exact entries and exact bans with the lower-cased sender as they
    are stored (a ban is an SQL equality), and finds an ``@list`` entry's list by its
    exact name: an entry with capitals or stray white space never matches there, so it
    does not here either.
    """
    if mode is Mode.MAILMAN2:
        text = text.strip()
    if not text.strip():
        return None
    if text.startswith("^"):
        flags = re.IGNORECASE if (ban or mode is Mode.MAILMAN2) else 0
        try:
            regex = re.compile(text, flags)
        except re.error:
            return None
        if mode is Mode.MAILMAN2 and not ban:
            return Pattern(text, regex=_SearchRegex(regex))
        return Pattern(text, regex=regex)
    if text.startswith("@") and not ban:
        return Pattern(text, at_list=text[1:].lower() if mode is Mode.MAILMAN2 else text[1:])
    return Pattern(text, exact=text.lower() if mode is Mode.MAILMAN2 else text)


class _SearchRegex:
    """Makes ``.match`` behave like ``re.search`` (Mailman 2's GetPattern)."""

    __slots__ = ("regex",)

    def __init__(self, regex: re.Pattern) -> None:
        self.regex = regex

    def match(self, text: str):
        return self.regex.search(text)


def _ban_list(entries: Iterable[str], problems: list[str], where: str) -> BanList:
    exact = set()
    patterns = []
    invalid = []
    for entry in entries:
        compiled = compile_pattern(entry, Mode.MAILMAN3, ban=True)
        if compiled is None:
            if entry.startswith("^"):
                invalid.append(entry)
                problems.append(f"{where}: ban {entry!r} is not a valid regular expression "
                                "(Mailman fails on a post whose sender it reaches: such "
                                "posts get the temporary failure)")
        elif compiled.regex is not None:
            patterns.append(compiled)
        else:
            exact.add(compiled.exact)
    return BanList(frozenset(exact), tuple(patterns), tuple(invalid))


def _no_pause() -> None:
    pass


def _normalised_pairs(specs, pause: Callable[[], None] = _no_pause):
    """(normalised address, own action) from MemberSpecs or a dict, first one of each
    address only.

    Loaders should hand over one string object per address however many lists it is on
    (the native and Mailman 3 loaders do): the snapshot keeps those objects."""
    seen = set()
    pairs = specs.items() if isinstance(specs, Mapping) else \
        ((spec.address, spec.action) for spec in specs)
    for count, (raw, action) in enumerate(pairs):
        address = canonical(raw)
        if address is not None and address not in seen:
            seen.add(address)
            yield address, action
        if not count & 1023:  # a big list is many milliseconds of work
            pause()


def _address_map(specs, pause: Callable[[], None] = _no_pause) -> dict[str, Action | None]:
    return dict(_normalised_pairs(specs, pause))


def _members(specs, pause: Callable[[], None] = _no_pause
             ) -> tuple[dict[str, None], dict[str, Action]]:
    """The member dict (address -> None) and the own actions, in one pass."""
    members: dict[str, None] = {}
    actions: dict[str, Action] = {}
    for address, action in _normalised_pairs(specs, pause):
        members[address] = None
        if action is not None:
            actions[address] = action
    return members, actions


def broken_list(spec: ListSpec, reason: str, problems: list[str]) -> ListPolicy | None:
    """The stand-in for a list whose rows could not be read: its addresses and
    ``broken``, nothing a decision could wrongly act on.  ``None`` (and a problem) when
    not even its posting address is usable."""
    posting = normalise(spec.posting_address)
    if posting is None:
        problems.append(f"list {spec.posting_address!r} is left out: bad posting address; "
                        f"{reason}")
        return None
    # Not in ``problems``: ``Snapshot.broken`` carries it (the service logs it once).
    local, _ = split_address(posting)
    return ListPolicy(
        posting_address=posting,
        list_id=spec.list_id or posting.replace("@", "."),
        display_name=spec.display_name or local,
        mode=spec.mode,
        emergency=False,
        default_member_action=Action.HOLD,
        default_nonmember_action=Action.HOLD,
        rejection_notice=None,
        members={},
        member_actions=MappingProxyType({}),
        member_aliases=MappingProxyType({}),
        nonmembers=MappingProxyType({}),
        nonmember_patterns=(),
        bans=BanList(),
        broken=reason,
    )


def build_isolated(spec: ListSpec, problems: list[str],
                   pause: Callable[[], None] = _no_pause) -> ListPolicy | None:
    """``build_list``, except that a list that is broken or cannot be built becomes a
    ``broken_list`` instead of failing every other list with it."""
    if spec.broken is not None:
        return broken_list(spec, spec.broken, problems)
    mark = len(problems)
    try:
        return build_list(spec, problems, pause)
    except Exception as error:  # noqa: BLE001 - any failure is this list's alone
        del problems[mark:]
        return broken_list(spec, f"cannot build the list: {type(error).__name__}: "
                                 f"{error}", problems)


def _broken_map(policies: Mapping[str, ListPolicy],
                candidates: Iterable[str] | None = None) -> Mapping[str, str]:
    names = policies if candidates is None else candidates
    return MappingProxyType({posting: policies[posting].broken for posting in names
                             if posting in policies and policies[posting].broken})


def build_list(spec: ListSpec, problems: list[str],
               pause: Callable[[], None] = _no_pause) -> ListPolicy:
    """One list's policy.  ``pause`` is called every thousand addresses or so: a point
    where a builder running beside a busy reactor may rest (``policyd.runtime.pacing``);
    the core itself never waits."""
    posting = normalise(spec.posting_address)
    if posting is None:
        raise ValueError(f"bad posting address {spec.posting_address!r}")
    members, actions = _members(spec.members, pause)
    aliases = {}
    for other, member in spec.user_aliases.items():
        other_n, member_n = normalise(other), normalise(member)
        if other_n and member_n in members and other_n not in members:
            aliases[other_n] = member_n
    groups = []
    for action, entries in (
        (Action.ACCEPT, spec.accept_these_nonmembers),
        (Action.HOLD, spec.hold_these_nonmembers),
        (Action.REJECT, spec.reject_these_nonmembers),
        (Action.DISCARD, spec.discard_these_nonmembers),
    ):
        compiled = []
        for entry in entries:
            pattern = compile_pattern(entry, spec.mode)
            if pattern is None:
                if entry.strip():
                    problems.append(
                        f"{posting}: {action.label}_these_nonmembers entry {entry!r} "
                        "is not a valid regular expression"
                    )
                continue
            if (pattern.at_list is not None and spec.mode is Mode.MAILMAN3
                    and action is not Action.ACCEPT):
                # Mailman 3 (rules/moderation.py _at_list) reads @list entries in
                # accept_these_nonmembers only; elsewhere one can never match.
                problems.append(f"{posting}: {action.label}_these_nonmembers entry "
                                f"{entry!r} is ignored (Mailman 3 reads @list entries "
                                "only in accept_these_nonmembers)")
                continue
            compiled.append(pattern)
        groups.append((action, tuple(compiled)))
    local, _ = split_address(posting)
    return ListPolicy(
        posting_address=posting,
        list_id=spec.list_id or posting.replace("@", "."),
        display_name=spec.display_name or local,
        mode=spec.mode,
        emergency=spec.emergency,
        default_member_action=spec.default_member_action,
        default_nonmember_action=spec.default_nonmember_action,
        rejection_notice=spec.rejection_notice or None,
        members=members,
        member_actions=MappingProxyType(actions),
        member_aliases=MappingProxyType(aliases),
        nonmembers=MappingProxyType(_address_map(spec.nonmembers, pause)),
        nonmember_patterns=tuple(groups),
        bans=_ban_list(spec.bans, problems, posting),
        content=_content(spec, posting, problems),
        smtp_moderation=_smtp_moderation(spec, posting, problems),
    )


def _smtp_moderation(spec: ListSpec, posting: str, problems: list[str]) -> SmtpModeration:
    """The list's ``smtp_moderation``; an unknown value is off (and a problem)."""
    value = spec.smtp_moderation
    if isinstance(value, SmtpModeration):
        return value
    try:
        return SmtpModeration.from_name(value or "off")
    except ValueError as error:
        problems.append(f"{posting}: {error}; SMTP-time moderation is off")
        return SmtpModeration.OFF


def _content(spec: ListSpec, posting: str, problems: list[str]) -> ContentPolicy:
    """The message rules' settings, patterns compiled as Mailman compiles them."""
    matches = []
    for header, pattern, action in spec.header_matches:
        try:
            regex = re.compile(pattern, re.IGNORECASE)
        except re.error:
            regex = None
            problems.append(f"{posting}: header_matches pattern {pattern!r} is not a valid "
                            "regular expression (Mailman skips it)")
        matches.append(HeaderMatch(header, pattern, regex, action))
    bounce = []
    # mailman/rules/suspicious.py _parse_matching_header_opt.
    for line in (spec.bounce_matching_headers or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        i = line.find(":")
        if i < 0:
            problems.append(f"{posting}: bounce_matching_headers line {line!r} has no colon")
            continue
        try:
            bounce.append((line[:i], re.compile(line[i + 1:].lstrip(), re.IGNORECASE)))
        except re.error:
            problems.append(f"{posting}: bounce_matching_headers line {line!r} is not a "
                            "valid regular expression")
    content = ContentPolicy(
        moderator_password=spec.moderator_password or None,
        header_matches=tuple(matches),
        max_message_size=spec.max_message_size or 0,
        max_num_recipients=spec.max_num_recipients or 0,
        require_explicit_destination=bool(spec.require_explicit_destination),
        acceptable_aliases=tuple(spec.acceptable_aliases),
        administrivia=bool(spec.administrivia),
        bounce_matching_headers=tuple(bounce),
        newsgroup_moderated=bool(spec.newsgroup_moderated),
        dmarc_mitigate_action=int(spec.dmarc_mitigate_action or 0),
        dmarc_mitigate_unconditionally=bool(spec.dmarc_mitigate_unconditionally),
        dmarc_addresses=tuple(spec.dmarc_addresses or ()),
        dmarc_quarantine=bool(spec.dmarc_quarantine),
    )
    return NO_CONTENT if content == NO_CONTENT else content


def build(
    lists: Iterable[ListSpec],
    *,
    domains: Mapping[str, str] | Iterable[str] = (),
    site_bans: Iterable[str] = (),
    version: str = "",
    built_at: float | None = None,
    source_state: object = None,
    pause: Callable[[], None] = _no_pause,
    site_header_checks: SiteHeaderChecks = NO_SITE_CHECKS,
) -> Snapshot:
    """Build a snapshot (``pause``: see ``build_list``).  ``domains`` maps each managed domain (alias domains included) to
    its mail host; the domains of the lists' posting addresses are always managed."""
    problems: list[str] = []
    policies: dict[str, ListPolicy] = {}
    for spec in lists:
        pause()
        policy = build_isolated(spec, problems, pause)
        if policy is not None:
            policies[policy.posting_address] = policy
    domain_map: dict[str, str] = {}
    if isinstance(domains, Mapping):
        for alias, host in domains.items():
            domain_map[alias.lower()] = host.lower()
    else:
        for host in domains:
            domain_map[host.lower()] = host.lower()
    for posting in policies:
        host = split_address(posting)[1]
        domain_map.setdefault(host, host)
    problems.extend(site_header_checks.notes)
    return Snapshot(
        lists=MappingProxyType(policies),
        domains=MappingProxyType(domain_map),
        site_bans=_ban_list(site_bans, problems, "site"),
        version=version,
        built_at=time.time() if built_at is None else built_at,
        problems=tuple(problems),
        source_state=source_state,
        broken=_broken_map(policies),
        site_header_checks=site_header_checks,
    )



def replace_lists(
    previous: Snapshot,
    specs: Iterable[ListSpec],
    removed: Iterable[str] = (),
    *,
    version: str,
    built_at: float | None = None,
    source_state: object = None,
    pause: Callable[[], None] = _no_pause,
) -> Snapshot:
    """A new snapshot sharing every ``ListPolicy`` of ``previous`` except the lists in
    ``specs`` (added or changed) and ``removed`` (posting addresses).

    What an incremental refresh swaps in: building a few lists costs milliseconds where a
    full build of a large store takes seconds.  Domains and site bans stay as they are; a
    backend that sees those change does a full build instead.
    """
    problems: list[str] = []
    policies = dict(previous.lists)
    for posting in removed:
        policies.pop(normalise(posting) or posting, None)
    rebuilt = set()
    for spec in specs:
        policy = build_isolated(spec, problems, pause)
        if policy is None:
            continue
        policies[policy.posting_address] = policy
        rebuilt.add(policy.posting_address)
    gone = rebuilt.union(normalise(p) or p for p in removed)
    broken = {posting: reason for posting, reason in previous.broken.items()
              if posting not in gone}
    broken.update(_broken_map(policies, rebuilt))
    kept = [p for p in previous.problems if p.split(":", 1)[0] not in gone]
    domains = dict(previous.domains)
    for posting in rebuilt:
        host = split_address(posting)[1]
        domains.setdefault(host, host)
    return Snapshot(
        lists=MappingProxyType(policies),
        domains=MappingProxyType(domains),
        site_bans=previous.site_bans,
        version=version,
        built_at=time.time() if built_at is None else built_at,
        problems=tuple(kept + problems),
        source_state=source_state,
        broken=MappingProxyType(broken),
        site_header_checks=previous.site_header_checks,
    )
