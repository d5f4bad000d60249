"""Mailman 3.3.10's ``dmarc-mitigation`` rule, on DNS answers already fetched (pure).

Mailman (``mailman/rules/dmarc.py``) takes the first address of the first From: header
(``parseaddr``), lower-cases it, and mitigates when it matches the list's
``dmarc_addresses`` or when the DMARC record of its domain says ``p=reject`` or
``p=quarantine`` (Mailman 3 has no separate quarantine handling: both count).  When
``_dmarc.<domain>`` has no DMARC record (NXDOMAIN, no TXT answer, or a first TXT record
that is not ``v=DMARC1;``), the organizational domain's record is read, its ``sp=`` first.
A DNS error other than NXDOMAIN (a timeout, SERVFAIL, REFUSED) counts as "mitigate" for
Mailman; at SMTP time it is doubt, and policyd's rule for doubt wins: the post gets the
temporary failure (``DNS_FAILED``: the sender retries, and the retry is decided on an
answer), never a 5xx caused by a resolver in trouble (docs/mailman-differences.md).  A
From: domain that is no DNS name at all (bytes that are not ASCII) is mitigated as Mailman
does: no retry would change it.  Of each TXT RRset only the first record is read, as
Mailman does.

The rule jumps to the ``dmarc`` chain (reject or discard) only when the list's
``dmarc_mitigate_action`` is ``reject`` or ``discard``; ``munge_from`` and
``wrap_message`` miss (Mailman changes the message later, the post is accepted), and so
does ``dmarc_mitigate_unconditionally``, which only Mailman's handler reads.  So a DNS
answer is needed only for a list that rejects or discards, and a message with a From:
domain: ``DmarcMitigation.check`` asks ``Context.dmarc`` (a ``known(name)`` function over
the daemon's cache, ``policyd.dmarc_lookup``) and raises ``LookupNeeded`` for the names it
does not know yet; the decider looks them up asynchronously and decides again.  Without a
lookup (``policyctl query --offline``) the rule misses and says it was not evaluated.

The organizational domain comes from the public suffix list (``PublicSuffixList``),
read from a file (``[dmarc] public_suffix_list``), with Mailman's matching algorithm.
"""

from __future__ import annotations

import enum
import re
from functools import lru_cache
from typing import Callable, Iterable, NamedTuple, Protocol

from .addresses import _addr_specs
from .mailman_headers import BoundedAddressList, _balanced_parentheses
from .rules import TOO_DEEP, Hit, Miss
from .verdict import Action, Verdict

__all__ = ["DmarcAction", "DnsAnswer", "PublicSuffixList", "LookupNeeded",
           "DNS_FAILED", "DmarcMitigation", "Mailman2DmarcModeration", "dmarc_names",
           "maybe_mitigate", "policy_of"]


class DmarcAction(enum.IntEnum):
    """``mailman.interfaces.mailinglist.DMARCMitigateAction``, same values."""

    NO_MITIGATION = 0
    MUNGE_FROM = 1
    WRAP_MESSAGE = 2
    REJECT = 3
    DISCARD = 4

    @classmethod
    def from_name(cls, name: str) -> "DmarcAction":
        try:
            return cls[str(name).strip().upper().replace("-", "_")]
        except KeyError:
            allowed = ", ".join(a.label for a in cls)
            raise ValueError(f"unknown DMARC mitigation {name!r} (allowed: {allowed})") \
                from None

    @property
    def label(self) -> str:
        return self.name.lower()


# Whether the rule can change the outcome at SMTP time.
DECIDING = frozenset({DmarcAction.REJECT, DmarcAction.DISCARD})
verdict_action = {Verdict.REJECT: Action.REJECT, Verdict.DISCARD: Action.DISCARD}

_MISS_OFF = Miss("dmarc_mitigate_action is no_mitigation")
_MISS_LATER = Miss("dmarc_mitigate_action munges or wraps: Mailman changes the message "
                   "later and accepts it (no lookup)")
_MISS_NO_MESSAGE = Miss("not evaluated: the MTA sent no message headers (Postfix, or an "
                        "Exim ACL without headers=)")
_MISS_NO_LOOKUP = Miss("not evaluated: no DNS lookup in this process (policyctl --offline)")


class DnsAnswer(NamedTuple):
    """The answer to one TXT query, as far as Mailman's rule reads it.

    ``status``: ``ok`` (an answer), ``nxdomain``, ``noanswer`` (no TXT at the end of the
    CNAME chain), ``failed`` (timeout, SERVFAIL, REFUSED, a malformed answer, an error
    reading it, ...: Mailman mitigates, policyd answers the temporary failure) or
    ``error`` (no DNS name: mitigated).
    ``rrsets``: the answer section grouped as dnspython groups it, in order:
    ``(owner name lower-cased with the final dot, "TXT" or "CNAME", value)``; a TXT value
    is the first record's strings joined (bytes), a CNAME value the target with the dot."""

    status: str
    rrsets: tuple[tuple[str, str, object], ...] = ()
    detail: str = ""


NXDOMAIN = DnsAnswer("nxdomain")
NOANSWER = DnsAnswer("noanswer")

_KEEP_LOOKING = object()
#: ``maybe_mitigate``'s answer when a lookup failed: the temporary failure at SMTP time.
DNS_FAILED = "dns-failed"


def policy_of(answer: DnsAnswer, name: str, org: bool = False, quarantine: bool = True):
    """``is_reject_or_quarantine`` on an answer: ``(True|False, detail)`` or
    ``(_KEEP_LOOKING, detail)``.  ``quarantine=False``: a quarantine policy is no
    reason to mitigate (Mailman 2.1's ``_DMARCProhibited`` for a list without
    ``dmarc_quarantine_moderation_action``; otherwise it reads an answer as this does)."""
    if answer.status in ("nxdomain", "noanswer"):
        return _KEEP_LOOKING, f"{name}: {answer.status}"
    if answer.status == "failed":
        return DNS_FAILED, f"{name}: DNS lookup failed ({answer.detail or 'no answer'})"
    if answer.status != "ok":
        return True, f"{name}: DNS lookup failed ({answer.detail or answer.status}): " \
                     "mitigated as Mailman does"
    results: dict[str, list[str]] = {}
    cnames: dict[str, str] = {}
    want = name + "."
    for owner, kind, value in answer.rrsets:
        if kind == "CNAME":
            cnames[owner] = value
        elif kind == "TXT":
            text = value.decode("utf-8", "surrogateescape") \
                if isinstance(value, bytes) else str(value)
            results.setdefault(owner, []).append(text)
    # Mailman's CNAME walk from the queried name (a loop stops it).
    seen = {want}
    while want in cnames and cnames[want] not in seen:
        want = cnames[want]
        seen.add(want)
    if want not in results:
        return False, f"{name}: no TXT record in the answer"
    dmarcs = [record for record in results[want] if record.startswith("v=DMARC1;")]
    if not dmarcs:
        return _KEEP_LOOKING, f"{name}: no v=DMARC1 record"
    if len(dmarcs) > 1:
        return False, f"{name}: {len(dmarcs)} v=DMARC1 records (ignored, RFC 7489)"
    for entry in dmarcs:
        mo = re.search(r"\bsp=(\w*)\b", entry, re.IGNORECASE)
        if org and mo:
            policy = mo.group(1).lower()
        else:
            mo = re.search(r"\bp=(\w*)\b", entry, re.IGNORECASE)
            if not mo:
                continue
            policy = mo.group(1).lower()
        if policy == "reject" or (quarantine and policy == "quarantine"):
            return True, f"{name}: {'sp' if org and 'sp=' in entry.lower() else 'p'}" \
                         f"={policy}"
        return False, f"{name}: p={policy}"
    return False, f"{name}: no policy"


class PublicSuffixList:
    """The public suffix list as Mailman's ``parse_suffix_list`` reads it, and its
    ``get_organizational_domain``, with a trie instead of a scan of every rule."""

    def __init__(self, lines: Iterable[str] = ()) -> None:
        # label -> (children, order, exception) with order the rule's first position.
        self._root: dict = {}
        self._order = 0
        self.rules = 0
        for line in lines:
            if not line.strip() or line.startswith("//"):
                continue
            line = re.sub(r"\s.*", "", line)
            if not line:
                continue
            parts = line.lower().split(".")
            exception = parts[0].startswith("!")
            if exception:
                parts[0] = parts[0][1:]
            parts.reverse()
            node = self._root
            entry = None
            for label in parts:
                entry = node.get(label)
                if entry is None:
                    entry = node[label] = [{}, None, False]
                node = entry[0]
            if entry[1] is None:
                entry[1] = self._order
                self._order += 1
                self.rules += 1
            entry[2] = exception

    @classmethod
    def from_file(cls, path) -> "PublicSuffixList":
        with open(path, encoding="utf-8") as fp:
            return cls(fp)

    def organizational_domain(self, domain: str) -> str:
        parts = domain.lower().split(".")
        parts.reverse()
        hits: list[tuple[int, int, bool]] = []   # (order, length, exception)
        stack = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            if depth >= len(parts):
                continue
            for label in {parts[depth], "*"}:
                entry = node.get(label)
                if entry is None:
                    continue
                if entry[1] is not None:
                    hits.append((entry[1], depth + 1, entry[2]))
                stack.append((entry[0], depth + 1))
        if not hits:
            return _domain(parts, 1)
        hits.sort()
        label = 0
        for _, length, exception in hits:
            if exception:
                return _domain(parts, length - 1)
            label = max(label, length)
        return _domain(parts, label)


def _domain(parts: list[str], label: int) -> str:
    return ".".join(reversed(parts[:min(label + 1, len(parts))]))


class LookupNeeded(Exception):
    """Raised by the rule for DMARC names not in the cache yet: the decider looks them
    up (``policyd.dmarc_lookup``, never blocking the reactor) and decides again."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__("a DMARC policy is being looked up")
        self.names = names


_UNDECODABLE = re.compile("[\udc80-\udcff]")


def from_address(message) -> str:
    """Mailman's ``parseaddr(str(msg.get('from', '')))``, lower-cased.  A header with
    bytes that are not ASCII is a ``Header`` in ``compat32`` whose ``str()`` has U+FFFD
    for each such byte (kept here as surrogate escapes)."""
    values = message.get_all("from")
    value = values[0] if values else ""
    if _UNDECODABLE.search(value):
        value = _UNDECODABLE.sub("\ufffd", value)
    _, address = _parseaddr(value)
    return address.lower()


@lru_cache(maxsize=256)
def _parseaddr(value: str) -> tuple[str, str]:
    """``email.utils.parseaddr(value)`` as a current Python has it (strict, the
    CVE-2023-27043 fix), whatever Python runs policyd (see ``mailman_headers``).
    Remembered: an Exim request naming many lists asks it once per list of the same
    From:, and a long one costs milliseconds to read."""
    if not _balanced_parentheses(value):
        value = "('', '')"
    found = [("", "") if "[" in address else (name, address)
             for name, address in BoundedAddressList(value).addresslist]
    return found[0] if len(found) == 1 else ("", "")


def dmarc_names(address: str, suffixes: PublicSuffixList) -> tuple[str, str | None]:
    """``_dmarc.<domain>`` and, when it differs, ``_dmarc.<organizational domain>``."""
    domain = address.rpartition("@")[2]
    org = suffixes.organizational_domain(domain)
    return f"_dmarc.{domain}", (f"_dmarc.{org}" if org != domain else None)


def _address_listed(address: str, listed: tuple[str, ...]) -> str | None:
    for entry in listed:
        if entry.startswith("^"):
            try:
                if re.search(entry, address, re.I):
                    return entry
            except re.error:
                continue
        elif entry.lower() == address:
            return entry
    return None


def maybe_mitigate(address: str, listed: tuple[str, ...], suffixes: PublicSuffixList,
                   known: Callable[[str], DnsAnswer | None], quarantine: bool = True
                   ) -> tuple[bool | str, str]:
    """Mailman's ``maybe_mitigate``: ``(mitigate, why)``, ``mitigate`` being
    ``DNS_FAILED`` where a lookup failed; raises ``LookupNeeded`` with the names whose
    answers ``known`` does not have.  ``quarantine``: see ``policy_of``."""
    entry = _address_listed(address, listed)
    if entry is not None:
        return True, f"{address} matches dmarc_addresses entry {entry!r}"
    if "@" not in address:
        return False, "the From: address has no domain"
    first, org = dmarc_names(address, suffixes)
    answer = known(first)
    if answer is None:
        missing = tuple(name for name in (first, org)
                        if name is not None and known(name) is None)
        raise LookupNeeded(missing)
    result, why = policy_of(answer, first, quarantine=quarantine)
    if result is not _KEEP_LOOKING:
        return result, why
    if org is None:
        return False, why
    answer = known(org)
    if answer is None:
        raise LookupNeeded((org,))
    result, why_org = policy_of(answer, org, org=True, quarantine=quarantine)
    if result is not _KEEP_LOOKING:
        return result, f"{why}; {why_org}"
    return False, f"{why}; {why_org}"


class Answers(Protocol):
    """What the rule reads DNS answers from: ``policyd.dmarc_lookup.DmarcLookup``."""

    suffixes: PublicSuffixList

    def known(self, name: str) -> DnsAnswer | None: ...


class DmarcMitigation:
    """The rule; ``answers`` is the daemon's DNS cache (``None``: no lookup here, the
    rule misses for lists that reject or discard, unless ``dmarc_addresses`` match)."""

    name = "dmarc-mitigation"
    description = ("Mailman's DMARC mitigation: a list whose dmarc_mitigate_action is "
                   "reject or discard rejects or discards a post From: a domain that "
                   "publishes p=reject or p=quarantine (or a dmarc_addresses match).")

    def __init__(self, answers: Answers | None = None) -> None:
        self.answers = answers

    def check(self, ctx):
        content = ctx.policy.content
        action = content.dmarc_mitigate_action
        if action not in DECIDING:
            return _MISS_OFF if action == DmarcAction.NO_MITIGATION else _MISS_LATER
        message = ctx.query.message
        if message is None:
            return _MISS_NO_MESSAGE
        try:
            address = from_address(message)
        except RecursionError:  # the senders were read, this parse of From: is another
            return Hit(Verdict.DEFER, f"{TOO_DEEP}: temporary failure (Mailman would parse "
                       "it)" if ctx.explain else "")
        answers = self.answers
        if answers is None:
            if _address_listed(address, content.dmarc_addresses) is None:
                return _MISS_NO_LOOKUP
            suffixes, known = _EMPTY_SUFFIXES, _never_known
        else:
            suffixes, known = answers.suffixes, answers.known
        mitigate, why = maybe_mitigate(address, content.dmarc_addresses, suffixes, known)
        if mitigate is DNS_FAILED:
            return Hit(Verdict.DEFER, f"the DMARC policy of the From: domain is unknown "
                       f"({why}): temporary failure (Mailman would mitigate)"
                       if ctx.explain else "", None, address or None)
        if not mitigate:
            return Miss(f"no mitigation: {why}" if ctx.explain else "")
        verdict = Verdict.REJECT if action == DmarcAction.REJECT else Verdict.DISCARD
        return Hit(verdict, f"DMARC mitigation {DmarcAction(action).label}: {why}" if ctx.explain
                   else "", verdict_action[verdict], address or None)


class Mailman2DmarcModeration:
    """Mailman 2.1's DMARC moderation (``Handlers/SpamDetect.py`` ``process``, before
    anything else): when ``dmarc_moderation_action`` is 3 (reject) or 4 (discard) and the
    address ``parseaddr`` takes from the first From: field is in the list's
    ``dmarc_moderation_addresses`` (Mailman 2.1.34+; ``MailList.GetPattern`` without an
    ``at_list``: a plain address compared lower-cased, a ``^regex`` searched ignoring
    case, ``@list`` entries ignored) or ``Utils.IsDMARCProhibited`` says its domain's
    DMARC policy is reject (or quarantine, with ``dmarc_quarantine_moderation_action``),
    the post is rejected or discarded.  Imported into ``dmarc_mitigate_action``,
    ``dmarc_addresses`` and ``dmarc_quarantine``.

    ``IsDMARCProhibited`` reads the DNS as Mailman 3's rule does (Mailman 3's is its
    port: ``_dmarc.<domain>``, then the organizational domain's record, its ``sp=``
    first; CNAMEs followed; several ``v=DMARC1`` records ignored), with two differences
    kept here: quarantine counts only with the flag, and an address whose ``@`` is its
    first character has no domain to look up.  A DNS error other than NXDOMAIN is
    "prohibited" for Mailman 2; at SMTP time it is doubt, the temporary failure, as for
    Mailman 3's rule.  The DNS half needs the message (Exim's DATA ACL): a query without
    one (Postfix) is decided on the address half alone."""

    name = "dmarc-moderation"
    description = ("Mailman 2.1: a list whose dmarc_moderation_action is reject or discard "
                   "rejects or discards a post whose From: address is in "
                   "dmarc_moderation_addresses or whose From: domain publishes a DMARC "
                   "policy of reject (or quarantine, with "
                   "dmarc_quarantine_moderation_action).")

    def __init__(self, answers: "Answers | None" = None) -> None:
        self.answers = answers

    @staticmethod
    def quiet(policy, snapshot) -> bool:
        # Asked for the MTA path's chain of a query without a message: the DNS half
        # needs one, so only the address half can hit there.
        content = policy.content
        return content.dmarc_mitigate_action not in DECIDING or not content.dmarc_addresses

    def check(self, ctx):
        content = ctx.policy.content
        action = content.dmarc_mitigate_action
        if action not in DECIDING:
            return _MISS_OFF_2 if action == DmarcAction.NO_MITIGATION else _MISS_LATER_2
        query = ctx.query
        message = query.message
        if message is None and not content.dmarc_addresses:
            return _MISS_NO_ADDRESSES
        if message is not None:
            values = message.get_all("from")
            value = values[0] if values else None
        else:
            value = query.from_header
        # Python 2.7's parseaddr: the first address getaddresses finds.
        specs = _addr_specs(value) if value else ()
        address = specs[0].lower() if specs and specs[0] else ""
        if not address:
            return Miss("no From: address" if ctx.explain else "")
        verdict = Verdict.REJECT if action == DmarcAction.REJECT else Verdict.DISCARD
        entry = _address_listed(address, content.dmarc_addresses)
        if entry is not None:
            return Hit(verdict, f"dmarc_moderation_action {DmarcAction(action).label}: "
                       f"{address} matches dmarc_moderation_addresses entry {entry!r}"
                       if ctx.explain else "", verdict_action[verdict], address)
        if message is None:
            return Miss(f"{address} is not in dmarc_moderation_addresses; the DMARC "
                        "record of its domain is not evaluated: the MTA sent no message "
                        "headers" if ctx.explain else "")
        if self.answers is None:
            return _MISS_NO_LOOKUP
        if address.rfind("@") < 1:
            return Miss("the From: address has no domain" if ctx.explain else "")
        prohibited, why = maybe_mitigate(address, (), self.answers.suffixes,
                                         self.answers.known, content.dmarc_quarantine)
        if prohibited is DNS_FAILED:
            return Hit(Verdict.DEFER, f"the DMARC policy of the From: domain is unknown "
                       f"({why}): temporary failure (Mailman 2 would moderate)"
                       if ctx.explain else "", None, address)
        if not prohibited:
            return Miss(f"not prohibited: {why}" if ctx.explain else "")
        return Hit(verdict, f"dmarc_moderation_action {DmarcAction(action).label}: {why}"
                   if ctx.explain else "", verdict_action[verdict], address)


_MISS_OFF_2 = Miss("dmarc_moderation_action is accept (0)")
_MISS_LATER_2 = Miss("dmarc_moderation_action munges or wraps: Mailman 2 changes the "
                     "message after delivery")
_MISS_NO_ADDRESSES = Miss("dmarc_moderation_addresses is empty, and the DMARC record of "
                          "the From: domain is not evaluated: the MTA sent no message "
                          "headers")


def _never_known(name: str):
    return None


_EMPTY_SUFFIXES = PublicSuffixList()
