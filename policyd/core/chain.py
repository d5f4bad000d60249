"""The chains as declarative tables, and ``decide()``: one query in, one traced decision out.

Pure: no Twisted, no SQLAlchemy, no clock.  The order of ``MAILMAN3_CHAIN`` is Mailman
3.3.10's built-in chain; the rules that read the message (approved, loop, header-match,
the content holds) need Exim's ``headers=``/``body=``/``size=`` and miss without them
(see ``message_rules`` and docs/mailman-differences.md).
"""

from __future__ import annotations

from functools import partial

from .rules import (
    AddressHeaders,
    AdministrativeAddress,
    BannedAddress,
    BrokenList,
    Context,
    Emergency,
    Hit,
    Mailman2MemberModeration,
    Mailman2NonmemberModeration,
    MemberModeration,
    Miss,
    NonmemberModeration,
    NoSenders,
    NullSender,
    ROLE_LOCAL_PARTS,
    RoleAddress,
    Rule,
    TOO_DEEP,
    UnknownList,
    address_headers_doubt,
    first_member,
    mode_senders,
)
from .message_rules import (
    APPROVED_OUTCOMES,
    CONTENT_HOLDS,
    PASSED_ON,
    Approved,
    HeaderMatchRule,
    Loop,
    Mailman2Approved,
    header_match_outcomes,
)
from .dmarc import DECIDING, DmarcMitigation, Mailman2DmarcModeration
from .snapshot import Snapshot
from .verdict import Decision, Mode, Query, TraceStep, Verdict

# broken-list comes after the rules that read only the recipient (the null sender and
# the administrative addresses do not depend on the list's rows) and before every rule
# that reads them.  role-address comes first: postmaster@ takes bounces (the null sender).
ROLE_ADDRESS = RoleAddress()
SMTP_CHAIN: tuple[Rule, ...] = (ROLE_ADDRESS, UnknownList(), NullSender(),
                                AdministrativeAddress(), BrokenList())

# mailman/chains/builtin.py, in its order.  The rules that read the message miss on the
# Postfix path (no headers) and say so in the trace; the holds after the moderation rules
# are Mailman's "defer" links followed by "any -> hold": the first that hits holds.
MAILMAN3_CHAIN: tuple[Rule, ...] = (
    DmarcMitigation(),
    NoSenders(),
    Approved(),
    Loop(),
    BannedAddress(),
    HeaderMatchRule(),
    Emergency(),
    MemberModeration(),
    NonmemberModeration(),
) + CONTENT_HOLDS

# Mailman 2.1's pipeline runs Moderate before Emergency, so an emergency list still
# rejects or discards what moderation rejects or discards; SpamDetect's DMARC check
# (dmarc_moderation_addresses) runs before both.
MAILMAN2_CHAIN: tuple[Rule, ...] = (
    Mailman2DmarcModeration(),
    Mailman2Approved(),
    Mailman2MemberModeration(),
    Mailman2NonmemberModeration(),
    Emergency(),
)

CHAINS = {Mode.MAILMAN3: MAILMAN3_CHAIN, Mode.MAILMAN2: MAILMAN2_CHAIN}

# What decide() runs: the SMTP-time rules, then the list's Mailman chain.
_FULL_CHAINS = {mode: SMTP_CHAIN + chain for mode, chain in CHAINS.items()}

# ``[rules] null_sender = mailman``: the same chains without ``null-sender``, so a null
# sender's post goes through the list's Mailman chain as Mailman would take it.
NULL_SENDER_MODES = ("reject", "mailman")
_SMTP_CHAIN_MAILMAN = tuple(rule for rule in SMTP_CHAIN if rule.name != "null-sender")
_CHAINS_BY_NULL_SENDER = {
    "reject": (SMTP_CHAIN, _FULL_CHAINS),
    "mailman": (_SMTP_CHAIN_MAILMAN,
                {mode: _SMTP_CHAIN_MAILMAN + chain for mode, chain in CHAINS.items()}),
}

# ``address-headers`` runs only for a query whose address fields are too large to read
# (``rules.address_headers_doubt``): after the SMTP-time rules, in place of the list's
# chain, whose every rule reads the senders.
ADDRESS_HEADERS = AddressHeaders()

ALL_RULES: tuple[Rule, ...] = SMTP_CHAIN + (ADDRESS_HEADERS,) + MAILMAN3_CHAIN + MAILMAN2_CHAIN

# The rules that read the message and, for a query without one (Postfix; an Exim ACL
# without headers=), can only miss, and without a note: the MTA path leaves them out of
# such a query's chain instead of paying a dozen "not evaluated" misses per query.
# ``policyctl query`` (explain) runs them all and shows each miss.
# (tests/test_chain.py checks that each of them misses so for every list it is given.)
MISS_WITHOUT_MESSAGE = frozenset({
    "dmarc-mitigation", "approved", "loop", "header-match", "administrivia",
    "implicit-dest", "max-recipients", "max-size", "no-subject", "digests",
    "suspicious-header"})


# The rules that read header fields other than From:, Reply-To: and Sender: (or the body's
# start): with a header block the MTA cut (``Message.headers_cut``) they could hit on a
# field's absence (no-subject, implicit-dest) or miss what comes past the cut, so they
# are not run; the post is then Mailman's to decide on those (an ACCEPT here is delivery
# to Mailman, which runs them on the whole message).  From:, Reply-To: and Sender: come
# whole (the sender rules and dmarc-mitigation run as usual), and so does the size.
NEED_WHOLE_HEADER = MISS_WITHOUT_MESSAGE - {"dmarc-mitigation", "max-size"}


_CUT = ("not evaluated: the MTA cut the header block (Exim's POLICYD_MAX_HEADERS); "
        "Mailman decides this on the whole message")


class _NotEvaluated:
    """In place of a rule that reads the whole header block, for a query whose block was
    cut: a miss that says why; for ``approved`` (a list with a moderator password) and
    ``header-match`` (an entry or site line that accepts or holds), one that says what
    the rule could have done, so that a later rule's reject or discard becomes the
    temporary failure (``decide``) rather than refusing a post Mailman might take."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._miss = Miss(_CUT)

    def check(self, ctx) -> Miss:
        if self.name == "approved":
            if ctx.policy.content.moderator_password is not None:
                return Miss(_CUT, note="approved: the header block was cut",
                            unseen=APPROVED_OUTCOMES)
        elif self.name == "header-match":
            outcomes = header_match_outcomes(ctx)
            if outcomes & PASSED_ON:
                return Miss(_CUT, note="header-match: the header block was cut",
                            unseen=outcomes)
        return self._miss


# Of the rules a cut header block leaves out, those whose hit can pass a post on that a
# later rule would refuse: they stay in the chain, as ``_NotEvaluated``.
_MAY_PASS_ON = frozenset({"approved", "header-match"})


def _whole_header_rules_left_out(chain: tuple[Rule, ...], explain: bool) -> tuple[Rule, ...]:
    return tuple(_NotEvaluated(rule.name) if rule.name in NEED_WHOLE_HEADER else rule
                 for rule in chain
                 if explain or rule.name not in NEED_WHOLE_HEADER
                 or rule.name in _MAY_PASS_ON)


# A verdict, and what a rule that could not be evaluated would have to be able to give
# for it to be doubt: a refusal of a post that might have been accepted or held
# (Mailman's ``approved`` comes before every refusing rule).  A hold needs nothing: it
# passes the post on, and Mailman runs ``approved`` itself.
_OVERRIDDEN_BY = {Verdict.REJECT: PASSED_ON, Verdict.DISCARD: PASSED_ON}


def _envelope_only(chain: tuple[Rule, ...]) -> tuple[Rule, ...]:
    return tuple(rule for rule in chain if rule.name not in MISS_WITHOUT_MESSAGE)


_ENVELOPE_CHAINS = {
    null_sender: {mode: _envelope_only(chain) for mode, chain in chains[1].items()}
    for null_sender, chains in _CHAINS_BY_NULL_SENDER.items()}


def _mta_chain(snapshot: Snapshot, policy, null_sender: str) -> tuple[Rule, ...]:
    """The list's chain for a query without a message on the MTA path: its envelope chain
    without the rules that are ``quiet`` for it (they would miss, and say nothing), made
    once per list, and again when the site bans change (a list an incremental refresh
    carries into the next snapshot keeps what it derived).  ``policyctl query`` (explain)
    runs every rule."""
    site_bans = snapshot.site_bans
    key = ("mta-chain", null_sender)
    found = policy.derived.get(key)
    if found is None or found[0] is not site_bans:
        found = policy.derived[key] = (site_bans, tuple(
            rule for rule in _ENVELOPE_CHAINS[null_sender][policy.mode]
            if not (hasattr(rule, "quiet") and rule.quiet(policy, snapshot))))
    return found[1]


def _with_roles(chain: tuple[Rule, ...], roles: frozenset[str]) -> tuple[Rule, ...]:
    """``chain`` with its ``role-address`` rule taking ``roles`` (``[rules]
    role_addresses`` other than the default), made once per chain and set."""
    key = (id(chain), roles)
    found = _ROLE_CHAINS.get(key)
    if found is None:
        rule = RoleAddress(roles)
        found = _ROLE_CHAINS[key] = tuple(rule if isinstance(rule_, RoleAddress) else rule_
                                          for rule_ in chain)
        _ROLE_KEEP.append(chain)
    return found


_ROLE_CHAINS: dict = {}
_ROLE_KEEP: list = []   # keeps the keys' chains alive (ids are not reused)


def _with_dmarc(chain: tuple[Rule, ...], answers) -> tuple[Rule, ...]:
    """``chain`` with its ``dmarc-mitigation`` (Mailman 3) or ``dmarc-moderation``
    (Mailman 2) reading ``answers`` (made once per chain and lookup: the daemon has one
    lookup)."""
    key = (id(chain), id(answers))
    found = _DMARC_CHAINS.get(key)
    if found is None:
        found = tuple(type(rule)(answers) if isinstance(
            rule, (DmarcMitigation, Mailman2DmarcModeration)) else rule for rule in chain)
        _DMARC_CHAINS[key] = found
        _DMARC_KEEP.append((chain, answers))
    return found


_DMARC_CHAINS: dict = {}
_DMARC_KEEP: list = []   # keeps the keys' objects alive (ids are not reused)


def decide(snapshot: Snapshot, query: Query, *, explain: bool = True,
           null_sender: str = "reject", dmarc=None,
           roles: frozenset[str] = ROLE_LOCAL_PARTS) -> Decision:
    """Run the chain.  ``explain=False`` (the MTA path) leaves the trace empty and the
    reason blank: every rule runs the same, only nothing is written down.

    ``null_sender`` (``[rules] null_sender``): ``reject`` runs the ``null-sender`` rule
    (the null sender may only write to a list's -bounces address); ``mailman`` leaves it
    out, so such a post is decided by the list's chain as Mailman would decide it.

    ``dmarc``: the DNS answers ``dmarc-mitigation`` reads (``policyd.dmarc_lookup``); it
    may raise ``core.dmarc.LookupNeeded``.  ``None``: that rule misses for the lists that
    reject or discard (not evaluated).

    ``roles`` (``[rules] role_addresses``): the local parts that ``role-address`` leaves
    to the MTA in a list domain when no list has that name (``postmaster``, ``abuse``).
    A recipient that is a list's address never reaches that question: the rule misses
    for it, and the MTA path leaves it out of a list's chain."""
    target = snapshot.resolve(query.recipient)
    if not target.managed_domain:
        return Decision(
            verdict=Verdict.ACCEPT,
            rule="not-managed",
            reason=f"{query.recipient!r} is not in a list domain: no opinion",
            trace=(TraceStep("not-managed", True, "recipient domain is not managed"),)
            if explain else (),
        )
    policy = target.list
    doubt = None
    if policy is not None:
        doubt = address_headers_doubt(query)
        if doubt is None:
            try:
                senders = mode_senders(policy.mode, query)
            except RecursionError:
                doubt = TOO_DEEP
    if doubt is not None:
        # Too much to read: the SMTP-time rules (which read only the recipient) decide
        # first, then ``address-headers`` answers the temporary failure.
        ctx = Context(snapshot, query, target, (), None, explain)
        chain = (SMTP_CHAIN if null_sender == "reject" else
                 _CHAINS_BY_NULL_SENDER[null_sender][0]) + (AddressHeaders(doubt),)
    elif policy is not None:
        ctx = Context(snapshot, query, target, senders, first_member(policy, senders),
                      explain)
        if query.message is None and not explain:
            chain = _mta_chain(snapshot, policy, null_sender)
        else:
            chain = (_FULL_CHAINS if null_sender == "reject"
                     else _CHAINS_BY_NULL_SENDER[null_sender][1])[policy.mode]
            if dmarc is not None and policy.content.dmarc_mitigate_action in DECIDING:
                chain = _with_dmarc(chain, dmarc)
            if query.message is not None and query.message.headers_cut:
                chain = _whole_header_rules_left_out(chain, explain)
    else:
        ctx = Context(snapshot, query, target, (), None, explain)
        chain = SMTP_CHAIN if null_sender == "reject" else \
            _CHAINS_BY_NULL_SENDER[null_sender][0]
        if roles is not ROLE_LOCAL_PARTS and roles != ROLE_LOCAL_PARTS:
            chain = _with_roles(chain, frozenset(roles))
    trace: list[TraceStep] | None = [] if explain else None
    note: Miss | None = None
    unseen: list[tuple[str, Miss]] | None = None
    for rule in chain:
        result = rule.check(ctx)
        if type(result) is Hit:
            if trace is not None:
                trace.append(TraceStep(rule.name, True, result.reason))
            if unseen is not None:
                doubt = _unseen_doubt(ctx, rule.name, result, unseen, trace)
                if doubt is not None:
                    return doubt
            return _decision(ctx, rule.name, result.verdict, result.reason, result.action,
                             result.sender, trace)
        if trace is not None:
            trace.append(TraceStep(rule.name, False, result.detail))
        if result.note is not None:
            note = result
            if result.unseen is not None:
                unseen = (unseen or []) + [(rule.name, result)]
    reason = "no rule held, rejected or discarded the post"
    if trace is not None:
        if note is not None:
            reason = f"{note.note}; {reason}"
        trace.append(TraceStep("accept", True, reason))
    return _decision(ctx, "accept", Verdict.ACCEPT, reason,
                     note.action if note else None, note.sender if note else None, trace)


#: The rule of a refusal turned into the temporary failure because a rule before it could
#: not read what it needs (``_unseen_doubt``).
INCOMPLETE = "incomplete-message"


def _unseen_doubt(ctx: Context, name: str, hit: Hit, unseen, trace) -> Decision | None:
    """``name``'s refusal, when a rule before it could not read what it needs
    (``unseen``: the header block or the body cut by the MTA) and might have passed the
    post on in Mailman's chain (a moderator's ``Approved:`` past the cut): doubt, so
    the temporary failure, never a 5xx (a moderator's post refused for good) nor an
    accept (anyone could pad a post past the cut to get one); else None.  The reason
    names both rules, and what the MTA should send for policyd to decide."""
    overridden = _OVERRIDDEN_BY.get(hit.verdict)
    if overridden is None:
        return None
    could = [(rule, miss) for rule, miss in unseen if miss.unseen & overridden]
    if not could:
        return None
    names = ", ".join(f"{rule} ({miss.note.partition(': ')[2] or miss.note})"
                      for rule, miss in could)
    reason = (f"{name} would {hit.verdict.value} the post, but {names} could not be "
              f"evaluated and might have passed it on: the temporary failure (the MTA "
              "must send more of the message: Exim's POLICYD_MAX_HEADERS, "
              "message_body_visible)")
    if trace is not None:
        trace.append(TraceStep(INCOMPLETE, True, reason))
    return _decision(ctx, INCOMPLETE, Verdict.DEFER, reason, None, hit.sender, trace)


# A Decision with every field given, built by ``tuple.__new__`` (in C) instead of the
# NamedTuple's generated ``__new__`` (a Python call): one per query on the MTA path.
_new_decision = partial(tuple.__new__, Decision)


def _decision(ctx: Context, rule, verdict, reason, action, sender, trace) -> Decision:
    target = ctx.target
    policy = target.list
    if policy is None:
        # No list: ``unknown-list`` names the address it refuses; ``role-address`` is no
        # opinion (``list`` None: Postfix DUNNO, Exim's 2.0.0, like an unmanaged domain).
        return _new_decision((verdict, rule, reason, action, sender,
                              None if rule == "role-address" else target.address,
                              target.role, None, ctx.senders,
                              tuple(trace) if trace else ()))
    return _new_decision((verdict, rule, reason, action, sender, policy.posting_address,
                          target.role, policy.rejection_notice, ctx.senders,
                          tuple(trace) if trace else ()))
