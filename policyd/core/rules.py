"""The rules, each small and named (pure).

A rule looks at a ``Context`` and returns a ``Hit`` (it decides) or a ``Miss`` (no
opinion, with the reason for the trace).  A miss may carry a ``note`` and ``action``:
Mailman's "defer" and Mailman 2's accepted member are misses that the final ``accept``
step reports, because later rules (Mailman 2's emergency) still get their say.

Sources: mailman 3.3.10 ``rules/moderation.py``, ``rules/banned_address.py``,
``chains/builtin.py``, ``email/message.py``; Mailman 2.1 ``Handlers/Moderate.py``.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from .addresses import (
    envelope_mailman3,
    first_address_mailman2,
    normalise_mailman2,
    parse_header,
    parse_header_mailman3,
)
from . import mailman_headers
from .snapshot import BanList, ListPolicy, Pattern, Snapshot, Target
from .verdict import ACTION_VERDICT, Action, Mode, Query, Role, Verdict


# NamedTuples, not frozen dataclasses: several are made per query on the hot path, and a
# tuple is built in C where a frozen dataclass pays object.__setattr__ per field.
class Context(NamedTuple):
    snapshot: Snapshot
    query: Query
    target: Target
    senders: tuple[str, ...]
    # The first sender that is a member: (sender, member address, member's own action),
    # or None.  Both modes' member and nonmember rules ask it; it is looked up once.
    member: tuple[str, str, Action | None] | None = None
    # False on the MTA path: the reasons and details are only read by ``policyctl
    # query``, so the rules leave them empty (formatting them was a tenth of a decision).
    explain: bool = True

    @property
    def policy(self) -> ListPolicy:
        return self.target.list


class Hit(NamedTuple):
    verdict: Verdict
    reason: str
    action: Action | None = None
    sender: str | None = None


class Miss(NamedTuple):
    detail: str
    note: str | None = None
    action: Action | None = None
    sender: str | None = None
    # A rule that could not read what it needs (the MTA cut the header block or the
    # body) and could have hit with one of these verdicts: a later rule's harsher verdict
    # is then not answered at SMTP time (``chain.decide``: left to Mailman).  Set only
    # with a ``note``.
    unseen: frozenset | None = None


# The misses that say the same every time: made once (several per query otherwise).
_NOT_NULL = Miss("envelope sender is not null")
_BOUNCE = Miss("null sender to the -bounces address is a bounce")
_POSTING = Miss("posting address")
_NOT_BANNED = Miss("no sender is banned")
_NO_EMERGENCY = Miss("emergency moderation is off")
_NO_MEMBER = Miss("no sender is a member")
_A_MEMBER = Miss("a sender is a member")
_QUIET = Miss("")


class Rule(Protocol):
    name: str
    description: str

    def check(self, ctx: Context) -> Hit | Miss: ...

    # Optional: ``quiet(policy, snapshot)`` is True when the rule misses, with no note,
    # for every query to that list (whatever its sender or message): the MTA path then
    # leaves it out of the list's chain (``core.chain``).


def _no_bans(bans: BanList) -> bool:
    return not bans.exact and not bans.patterns and not bans.invalid


def _each_field(message, name: str, parse) -> tuple[str, ...]:
    """The addresses of every ``name`` field of the message, each field parsed on its own
    (as Mailman does: ``get_all`` and one parse per field)."""
    out: tuple[str, ...] = ()
    for value in message.get_all(name):
        out += parse(value)
    return out


def senders_mailman3(query: Query) -> tuple[str, ...]:
    """Mailman 3's ``msg.senders``: From:, envelope, Reply-To:, Sender:, minus what its
    validator would drop (it sees the addresses as written, before normalisation)."""
    senders = envelope_mailman3(query.envelope_sender)
    message = query.message
    if message is not None:
        return (_each_field(message, "from", parse_header_mailman3) + senders
                + _each_field(message, "reply-to", parse_header_mailman3)
                + _each_field(message, "sender", parse_header_mailman3))
    # An absent header (always, on the Postfix path) costs no call.
    if query.from_header:
        senders = parse_header_mailman3(query.from_header) + senders
    if query.reply_to_header:
        senders += parse_header_mailman3(query.reply_to_header)
    if query.sender_header:
        senders += parse_header_mailman3(query.sender_header)
    return senders


def senders_mailman2(query: Query) -> tuple[str, ...]:
    """Mailman 2.1's ``msg.get_senders()`` order: From:, envelope, Reply-To:, Sender:."""
    message = query.message
    if message is not None:
        envelope = normalise_mailman2(query.envelope_sender)
        return (_each_field(message, "from", parse_header)
                + ((envelope,) if envelope is not None else ())
                + _each_field(message, "reply-to", parse_header)
                + _each_field(message, "sender", parse_header))
    out = list(parse_header(query.from_header))
    envelope = normalise_mailman2(query.envelope_sender)
    if envelope is not None:
        out.append(envelope)
    out.extend(parse_header(query.reply_to_header))
    out.extend(parse_header(query.sender_header))
    return tuple(out)


def sender_mailman2(query: Query) -> str | None:
    """Mailman 2.1's ``msg.get_sender()``: the first address of the first From: field,
    unless it is empty, else of the first Sender: field, else the envelope sender.  The
    nonmember lists are checked against this one address."""
    message = query.message
    if message is not None:
        for name in ("from", "sender"):
            values = message.get_all(name)  # Mailman 2 reads the first field only
            sender = first_address_mailman2(values[0]) if values else None
            if sender:
                return sender
        return normalise_mailman2(query.envelope_sender)
    for header in (query.from_header, query.sender_header):
        sender = first_address_mailman2(header)
        if sender:
            return sender
    return normalise_mailman2(query.envelope_sender)


# --- How much of the address headers policyd reads on the reactor -----------------------
#
# Reading a sender out of From:, Reply-To: and Sender: is the standard library's tokenizer
# (``email._parseaddr``), pure Python, character by character, and the first From: is
# read twice in Mailman 3 mode (senders, then ``dmarc-mitigation``).  What it costs is
# its specials, ``@<>[]:;,()\"`` (each up to ten times an ordinary character), and its
# length.  Real fields have few: about 6 specials per address; a
# 30-address Reply-To: with encoded names, the longest shape real mail has, is some
# 3,700 characters and 120 to 180 specials.  Crafted ones are all specials
# (``@@@...``, ``[a[a...``, ``a;a;...``).  Anyone can write any From: (Exim's DATA ACL
# sends it), and a value seen once sidesteps the parsing caches.  So the address fields
# of one query are read only up to sizes no real message reaches, with room to spare;
# beyond them the post gets the temporary failure (``address-headers``), never a silent
# skip of a field and never an accept.  (Mailman would parse them;
# docs/mailman-differences.md.)  Groups nested deeper than ``MAX_GROUP_DEPTH``
# (``mailman_headers``) or deeper than the interpreter's recursion limit get it too.

#: Characters of all From:, Reply-To: and Sender: fields of one query together, each
#: unfolded (CR and LF removed, as Mailman removes them before it parses): over twice the
#: 30-address Reply-To:.  Exim's request line (``[exim] max_request``, 64 KiB of base64)
#: carries up to six times this.
MAX_ADDRESS_CHARS = 8192
#: Of those characters, specials (``ADDRESS_SPECIALS``): six times the 30-address
#: Reply-To:, some 170 addresses.  Only a text over this many characters can hold more.
MAX_ADDRESS_SPECIALS = 1024
ADDRESS_SPECIALS = '@<>[]:;,()\\"'
#: Fields of one name (From:, Reply-To:, Sender:); RFC 5322 allows one of each.  Each field
#: is parsed on its own (a cache miss, a tokenizer run, even for a tiny field): thousands
#: of one-character fields would cost as much as one long one.
MAX_ADDRESS_FIELDS = 10

_ADDRESS_FIELDS = (("from", "From:"), ("reply-to", "Reply-To:"), ("sender", "Sender:"))
_ADDRESS_NAMES = tuple(name for name, _ in _ADDRESS_FIELDS)
TOO_DEEP = ("a From:, Reply-To: or Sender: field nests groups or comments deeper than "
            "the address parser follows")


def _unfolded(value: str) -> int:
    return len(value) - value.count("\n") - value.count("\r")


def _specials(value: str) -> int:
    return sum(map(value.count, ADDRESS_SPECIALS))


def address_headers_doubt(query: Query) -> str | None:
    """Why the address fields of ``query`` are too large to read at SMTP time (the
    temporary failure), or ``None``: at once for the usual query (a few C calls), which
    has no address header (Postfix) or short ones, each once."""
    message = query.message
    if message is None:
        frm, reply_to, sender = query.from_header, query.reply_to_header, query.sender_header
        if not (frm or reply_to or sender):
            return None
        # Fewer newlines than MAX_ADDRESS_FIELDS: fewer fields (Exim's ``$rh_from:`` joins
        # repeated fields with newlines, ``mailman_headers.fields``).
        joined = f"{frm or ''}{reply_to or ''}{sender or ''}"
        if len(joined) <= MAX_ADDRESS_SPECIALS and joined.count("\n") < MAX_ADDRESS_FIELDS:
            return None
        return _address_fields_doubt([
            [] if not value else mailman_headers.fields(value) if "\n" in value
            else [value] for value in (frm, reply_to, sender)])
    names = message.names or message._names()
    headers = message.headers
    total = 0
    for name in _ADDRESS_NAMES:
        count = names.count(name)
        if count == 1:
            total += len(headers[names.index(name)][1])
        elif count:
            break  # several fields of one name: counted in full
    else:
        if total <= MAX_ADDRESS_SPECIALS:
            return None
    return _address_fields_doubt([message.get_all(name) for name in _ADDRESS_NAMES])


def _address_fields_doubt(fields: list[list[str]]) -> str | None:
    total = 0
    for (_, label), values in zip(_ADDRESS_FIELDS, fields):
        if len(values) > MAX_ADDRESS_FIELDS:
            return (f"{len(values)} {label} fields, more than {MAX_ADDRESS_FIELDS}: too many "
                    "to read at SMTP time")
        total += sum(map(_unfolded, values))
    if total <= MAX_ADDRESS_SPECIALS:
        return None
    sizes = ", ".join(f"{label} {sum(map(_unfolded, values))}"
                      for (_, label), values in zip(_ADDRESS_FIELDS, fields) if values)
    if total > MAX_ADDRESS_CHARS:
        return (f"the address fields are {total} characters ({sizes}), more than "
                f"{MAX_ADDRESS_CHARS}: too long to read at SMTP time")
    specials = sum(_specials(value) for values in fields for value in values)
    if specials > MAX_ADDRESS_SPECIALS:
        return (f"the address fields ({sizes} characters) hold {specials} of the "
                f"characters {ADDRESS_SPECIALS}, more than {MAX_ADDRESS_SPECIALS}: too many "
                "to read at SMTP time")
    return None


class AddressHeaders:
    name = "address-headers"
    description = ("A post whose From:, Reply-To: and Sender: fields are too large to read "
                   f"at SMTP time (over {MAX_ADDRESS_CHARS} characters together, over "
                   f"{MAX_ADDRESS_SPECIALS} of {ADDRESS_SPECIALS} in them, over "
                   f"{MAX_ADDRESS_FIELDS} fields of one name, or nested too deeply) gets a "
                   "temporary failure; the rules that read only the recipient decide first.")

    def __init__(self, doubt: str | None = None) -> None:
        self.doubt = doubt

    def check(self, ctx: Context) -> Hit | Miss:
        if self.doubt is None:
            return _READ
        return Hit(Verdict.DEFER, f"{self.doubt}: temporary failure (Mailman would parse "
                   "them)" if ctx.explain else "")


_READ = Miss("the address fields were read")


def _action_hit(action: Action, reason: str, sender: str | None) -> Hit:
    return Hit(ACTION_VERDICT[action], reason, action, sender)


# --- SMTP-time rules: Mailman never sees these cases, the MTA must answer them ----------


#: ``[rules] role_addresses``' default: the local parts RFC 5321 (section 4.5.1:
#: ``postmaster``) and RFC 2142 (``abuse``) expect at every domain that takes mail.
ROLE_LOCAL_PARTS = frozenset({"postmaster", "abuse"})


class RoleAddress:
    """A role address (``postmaster@``, ``abuse@``) of a list domain that is no list.

    The MTA asks policyd before its own maps could take such an address (Postfix's
    ``smtpd_recipient_restrictions`` runs before ``virtual_alias_maps``; Exim's RCPT ACL
    before its routers): ``unknown-list`` would refuse it with a 5.1.1, against RFC 5321
    section 4.5.1 and RFC 2142.  policyd has no opinion on it instead (Postfix
    ``DUNNO``, Exim ``ACCEPT 250 2.0.0``, as for a domain it does not manage): the MTA's
    own maps decide.  A list of that name keeps its list."""

    name = "role-address"
    description = ("A role address of a list domain that is no list (postmaster@, abuse@: "
                   "[rules] role_addresses): no opinion, the MTA's own maps decide.")

    def __init__(self, local_parts: frozenset[str] = ROLE_LOCAL_PARTS) -> None:
        self.local_parts = frozenset(local_parts)

    @staticmethod
    def quiet(policy: ListPolicy, snapshot: Snapshot) -> bool:
        return True  # asked only about a list: a recipient that resolved to one

    def check(self, ctx: Context) -> Hit | Miss:
        target = ctx.target
        if target.list is not None:
            if not ctx.explain:
                return _QUIET
            return Miss(f"{target.address} is an address of a list")
        local = target.address.rpartition("@")[0].split("+", 1)[0]
        if local in self.local_parts:
            return Hit(Verdict.ACCEPT, f"{target.address} is a role address ([rules] "
                       "role_addresses), not a list: no opinion, the MTA's own maps decide"
                       if ctx.explain else "")
        if not ctx.explain:
            return _QUIET
        return Miss(f"{local or '(empty)'} is not a role address"
                    + (f" ({', '.join(sorted(self.local_parts))})" if self.local_parts
                       else " (none configured)"))


class UnknownList:
    name = "unknown-list"
    description = "A recipient in a list domain that is no list (5.1.1 at RCPT)."

    @staticmethod
    def quiet(policy: ListPolicy, snapshot: Snapshot) -> bool:
        return True  # asked only about a list: a recipient that resolved to one

    def check(self, ctx: Context) -> Hit | Miss:
        if ctx.target.list is None:
            return Hit(Verdict.REJECT, f"no list at {ctx.target.address}" if ctx.explain
                       else "")
        if not ctx.explain:
            return _QUIET
        return Miss(f"{ctx.target.address} is the {ctx.target.role.value} address of "
                    f"{ctx.policy.posting_address}")


class NullSender:
    name = "null-sender"
    description = "The null sender <> may only write to a list's -bounces address."

    def check(self, ctx: Context) -> Hit | Miss:
        if ctx.query.envelope_sender.strip() not in ("", "<>"):
            return _NOT_NULL
        if ctx.target.role is Role.BOUNCES:
            return _BOUNCE
        return Hit(Verdict.REJECT, f"the null sender may not write to {ctx.target.address}"
                   if ctx.explain else "")


class AdministrativeAddress:
    name = "administrative-address"
    description = "Mail to -request, -owner, -bounces and the like is not a post."

    def check(self, ctx: Context) -> Hit | Miss:
        if ctx.target.role is Role.POST:
            return _POSTING
        return Hit(Verdict.ACCEPT,
                   f"{ctx.target.address} is the list's {ctx.target.role.value} address, "
                   "not a post" if ctx.explain else "")


class BrokenList:
    name = "broken-list"
    description = ("A post to a list whose rows could not be read (an unloadable pickle, "
                   "an unknown action) gets a temporary failure; every other list is "
                   "decided as usual.")

    @staticmethod
    def quiet(policy: ListPolicy, snapshot: Snapshot) -> bool:
        return policy.broken is None

    def check(self, ctx: Context) -> Hit | Miss:
        reason = ctx.policy.broken
        if reason is None:
            return _READABLE
        return Hit(Verdict.DEFER, f"the rows of {ctx.policy.posting_address} could not be "
                   f"read: {reason}" if ctx.explain else "")


_READABLE = Miss("the list's rows were read")


# --- Mailman 3 ---------------------------------------------------------------------------


class NoSenders:
    name = "no-senders"
    description = "Mailman 3 discards a message with no valid sender address."

    def check(self, ctx: Context) -> Hit | Miss:
        if ctx.senders:
            return Miss("senders: " + ", ".join(ctx.senders)) if ctx.explain else _QUIET
        if senders_unseen(ctx.query):
            return _SENDERS_UNSEEN
        return Hit(Verdict.DISCARD, "no valid sender address in From:, envelope, "
                   "Reply-To: or Sender:", Action.DISCARD)


def senders_unseen(query: Query) -> bool:
    """No message and no From:, Reply-To: or Sender: value: the Postfix path (or an Exim
    ACL that sent neither ``headers=`` nor a header value).  Mailman takes the post from
    those fields, so a query without a valid envelope sender has senders policyd cannot
    see: ``no-senders`` and the default nonmember action have no opinion on it (Mailman
    decides); they decide only on a sender they saw, or on the fields' absence seen in
    the message."""
    return (query.message is None and query.from_header is None
            and query.reply_to_header is None and query.sender_header is None)


_SENDERS_UNSEEN = Miss("not evaluated: no valid envelope sender, and without the message "
                       "the MTA sent no From:, Reply-To: or Sender: (Mailman reads them)")


class BannedAddress:
    name = "banned-address"
    description = "A banned sender (list or site-wide, exact or ^regex) is discarded."

    @staticmethod
    def quiet(policy: ListPolicy, snapshot: Snapshot) -> bool:
        return _no_bans(policy.bans) and _no_bans(snapshot.site_bans)

    def check(self, ctx: Context) -> Hit | Miss:
        # In Mailman's order (``BanManager.is_banned``): the exact bans of the list and the
        # site, then the list's patterns, then the site's.
        bans, site = ctx.policy.bans, ctx.snapshot.site_bans
        for sender in ctx.senders:
            if sender in bans.exact:
                entry, scope = sender, "list"
            elif sender in site.exact:
                entry, scope = sender, "site-wide"
            else:
                # Mailman's ``re.match`` raises on an entry that does not compile when it
                # reaches it: the post is shunted, never delivered (a pattern before it in
                # the table's unordered rows may ban the sender first). Doubt: 4xx.
                entry, scope = (None if bans.invalid else bans.match_pattern(sender)), "list"
                if entry is None:
                    if bans.invalid or site.invalid:
                        return _invalid_ban(bans if bans.invalid else site, sender, ctx)
                    entry, scope = site.match_pattern(sender), "site-wide"
            if entry is not None:
                return Hit(Verdict.DISCARD, f"{sender} is banned ({scope} ban {entry!r})",
                           Action.DISCARD, sender)
        return _NOT_BANNED


def _invalid_ban(bans: BanList, sender: str, ctx: Context) -> Hit | Miss:
    what = f"ban {bans.invalid[0]!r} is not a valid regular expression"
    if ctx.query.message is None and ctx.policy.content.moderator_password is not None:
        # The envelope-only question (Exim's RCPT ACL, Postfix): Mailman's ``approved``,
        # before this rule, may accept the post with the moderator password: a 4xx now
        # would turn that post away too.  Left to the question with the message.
        return Miss(f"not evaluated: {what}; without the message, an Approved: post "
                    "may pass before it")
    return Hit(Verdict.DEFER, f"{what}: Mailman fails on a post from {sender} when it "
               "reaches it (banned-address raises, the post is shunted)", None, sender)


class Emergency:
    name = "emergency"
    description = "A list in emergency moderation holds every post."

    @staticmethod
    def quiet(policy: ListPolicy, snapshot: Snapshot) -> bool:
        return not policy.emergency

    def check(self, ctx: Context) -> Hit | Miss:
        if ctx.policy.emergency:
            return Hit(Verdict.HOLD, "the list is in emergency moderation", Action.HOLD,
                       ctx.senders[0] if ctx.senders else None)
        return _NO_EMERGENCY


def first_member(policy: ListPolicy, senders) -> tuple[str, str, Action | None] | None:
    """The first sender that is a member of the list (itself or through its user)."""
    for sender in senders:
        found = policy.find_member(sender)
        if found is not None:
            return sender, found[0], found[1]
    return None


def _member_words(sender: str, member: str) -> str:
    return sender if sender == member else f"{sender} (through {member} of the same user)"


class MemberModeration:
    name = "member-moderation"
    description = ("The first sender that is a member decides, with the member's action "
                   "or else the list's default member action.")

    def check(self, ctx: Context) -> Hit | Miss:
        found = ctx.member
        if found is None:
            return _NO_MEMBER
        sender, member, own = found
        action = ctx.policy.default_member_action if own is None else own
        if not ctx.explain:
            if action is Action.DEFER:
                return Miss("", note="", action=action, sender=sender)
            return _action_hit(action, "", sender)
        source = "list default" if own is None else "member's own"
        who = _member_words(sender, member)
        if action is Action.DEFER:
            return Miss(f"{who} is a member; {source} action defer: no opinion",
                        note=f"{who} is a member", action=action, sender=sender)
        return _action_hit(action, f"{who} is a member; {source} action {action.label}",
                           sender)


class NonmemberModeration:
    name = "nonmember-moderation"
    description = ("For a nonmember: its own nonmember action, else the "
                   "accept/hold/reject/discard_these_nonmembers lists, else the list's "
                   "default nonmember action.")

    def check(self, ctx: Context) -> Hit | Miss:
        policy = ctx.policy
        if ctx.member is not None:
            return _A_MEMBER
        for sender in ctx.senders:
            own = policy.nonmembers.get(sender)
            if own is not None:
                reason = f"{sender} is a nonmember with its own action {own.label}" \
                    if ctx.explain else ""
                if own is Action.DEFER:
                    return Miss(reason + ": no opinion", note=reason, action=own,
                                sender=sender)
                return _action_hit(own, reason, sender)
            for action, patterns in policy.nonmember_patterns:
                entry = _matching_entry(ctx.snapshot, policy, patterns, sender)
                if entry is None:
                    continue
                if type(entry) is Unreadable:
                    return _unreadable_hit(entry, action, sender)
                reason = f"{sender} matches {entry!r} in {action.label}_these_nonmembers" \
                    if ctx.explain else ""
                if action is Action.ACCEPT:
                    # Mailman 3 turns accept_these_nonmembers into "defer".
                    return Miss(reason, note=reason, action=Action.DEFER, sender=sender)
                return _action_hit(action, reason, sender)
        if not ctx.senders and senders_unseen(ctx.query):
            # No sender seen at all (no-senders missed): the post's From: decides in
            # Mailman, a member's post or a nonmember's; no opinion.
            return _SENDERS_UNSEEN
        action = policy.default_nonmember_action
        sender = ctx.senders[-1] if ctx.senders else None
        reason = f"no sender is a member; list default nonmember action {action.label}" \
            if ctx.explain else ""
        if action is Action.DEFER:
            return Miss(reason, note=reason, action=action, sender=sender)
        return _action_hit(action, reason, sender)


class Unreadable(NamedTuple):
    """What ``_matching_entry`` found instead of an answer: an ``@list`` entry whose list's
    rows could not be read (``ListPolicy.broken``), which no other entry of the group
    outweighed.  Whether the sender is one of its members is unknown, so the post gets
    the temporary failure, as a post to that list would (``broken-list``); matching
    nobody would answer from a membership policyd could not read."""

    entry: str
    list: str
    reason: str


def _matching_entry(snapshot: Snapshot, policy: ListPolicy, patterns: tuple[Pattern, ...],
                    sender: str) -> str | Unreadable | None:
    unreadable = None
    for pattern in patterns:
        if pattern.exact is not None:
            if pattern.exact == sender:
                return pattern.text
        elif pattern.regex is not None:
            if pattern.regex.match(sender):
                return pattern.text
        elif pattern.at_list is not None and pattern.at_list != policy.posting_address:
            other = snapshot.lists.get(pattern.at_list)
            if other is not None:
                if sender in other.members:
                    return pattern.text
                if other.broken is not None and unreadable is None:
                    # A later entry of the group may still match: the group's action is
                    # then the answer whatever the unread list holds.
                    unreadable = Unreadable(pattern.text, other.posting_address,
                                            other.broken)
    return unreadable


def _unreadable_hit(found: Unreadable, action: Action, sender: str) -> Hit:
    return Hit(Verdict.DEFER, f"{sender}: {action.label}_these_nonmembers entry "
               f"{found.entry!r} names {found.list}, whose rows could not be read "
               f"({found.reason}): whether {sender} is a member is unknown", None, sender)


# --- Mailman 2.1 -------------------------------------------------------------------------


class Mailman2MemberModeration:
    name = "member-moderation"
    description = ("Mailman 2.1: the first sender that is a member decides; a member with "
                   "the Moderate bit gets member_moderation_action, any other is accepted.")

    def check(self, ctx: Context) -> Hit | Miss:
        found = ctx.member
        if found is None:
            return _NO_MEMBER
        sender, member, action = found
        if action in (Action.HOLD, Action.REJECT, Action.DISCARD):
            return _action_hit(action, f"{sender} is a moderated member; "
                               f"member_moderation_action {action.label}", sender)
        detail = f"{sender} is a member without the Moderate bit"
        return Miss(detail, note=detail, action=Action.ACCEPT, sender=sender)


class Mailman2NonmemberModeration:
    name = "nonmember-moderation"
    description = ("Mailman 2.1: the From: (else Sender:, else envelope) address against "
                   "accept/hold/reject/discard_these_nonmembers, else "
                   "generic_nonmember_action.")

    def check(self, ctx: Context) -> Hit | Miss:
        policy = ctx.policy
        if ctx.member is not None:
            return _A_MEMBER
        sender = sender_mailman2(ctx.query) or ""
        for action, patterns in policy.nonmember_patterns:
            entry = _matching_entry(ctx.snapshot, policy, patterns, sender) if sender else None
            if entry is None:
                continue
            if type(entry) is Unreadable:
                return _unreadable_hit(entry, action, sender)
            reason = f"{sender} matches {entry!r} in {action.label}_these_nonmembers"
            if action is Action.ACCEPT:
                return Miss(reason, note=reason, action=Action.ACCEPT, sender=sender)
            return _action_hit(action, reason, sender)
        action = policy.default_nonmember_action
        reason = (f"{sender or 'no sender'} is not a member; "
                  f"generic_nonmember_action {action.label}")
        if action in (Action.ACCEPT, Action.DEFER):
            return Miss(reason, note=reason, action=Action.ACCEPT, sender=sender or None)
        return _action_hit(action, reason, sender or None)


def mode_senders(mode: Mode, query: Query) -> tuple[str, ...]:
    return senders_mailman3(query) if mode is Mode.MAILMAN3 else senders_mailman2(query)
