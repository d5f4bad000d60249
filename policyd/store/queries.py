"""The native store's queries: plain functions over a ``Session``, used by ``policyctl``.

Every function validates its input (addresses with ``policyd.core.addresses.normalise``,
patterns by compiling them) and raises ``BadInput`` or ``NotFound`` *before* it writes,
and callers run a whole command in one transaction (``Store.write()``), so a failing
command leaves nothing half-written.  Bulk paths use executemany with plain dicts and
look rows up in chunks, never one object per address.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session

from ..core import validate
from ..core.addresses import normalise, split_address
from ..errors import AlreadyExists, BadInput, NotFound
from ..core.verdict import Action, Mode
from ..core.moderation import SmtpModeration
from ..core.dmarc import DmarcAction
from .models import (
    ADDRESS_LENGTH,
    PATTERN_LENGTH,
    Address,
    Ban,
    Domain,
    MailingList,
    Membership,
    MemberRole,
    NonmemberPattern,
    StoreState,
    User,
    new_store_id,
)

CHUNK = 500
PATTERN_KINDS = (Action.ACCEPT, Action.HOLD, Action.REJECT, Action.DISCARD)
# A list name must not look like another list's administrative address or carry a +tag.
_LIST_NAME = re.compile(r"^[a-z0-9][a-z0-9._=-]*$")


# --- change tracking ---------------------------------------------------------------------


def bump(session: Session) -> None:
    """Mark the store changed: every writer runs this in the transaction of its change."""
    result = session.execute(
        update(StoreState).where(StoreState.id == 1)
        .values(generation=StoreState.generation + 1)
    )
    if result.rowcount == 0:
        # The row is gone (deleted by hand): whatever it said, this is a store the
        # daemon must rebuild from in full, so it gets a new id.
        session.execute(insert(StoreState).values(id=1, generation=1,
                                                  store_id=new_store_id()))


def generation(session: Session) -> int:
    return session.execute(select(StoreState.generation).where(StoreState.id == 1)).scalar_one()


# --- parsing -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One address to subscribe: normalised, as typed, and its moderation action."""

    email: str
    original: str
    action: Action | None = None


def parse_address(text: str, *, strict: bool = True) -> tuple[str, str]:
    """(normalised, as typed) or ``BadInput``.  Strict (what is stored) also refuses what
    no sender can ever be (``policyd.core.validate``); lookups pass ``strict=False`` so
    that such an address stored before can still be removed."""
    original = text.strip()
    if original.startswith("<") and original.endswith(">"):
        original = original[1:-1].strip()
    email = normalise(original)
    reason = validate.problem(original) if strict else None
    if email is None or reason is not None:
        raise BadInput(f"malformed address {text!r}" + (f": {reason}" if reason else ""))
    if len(email) > ADDRESS_LENGTH or len(original) > ADDRESS_LENGTH:
        raise BadInput(f"address {text!r} is longer than {ADDRESS_LENGTH} characters")
    return email, original


def parse_action(name: str) -> Action:
    try:
        return Action.from_name(name)
    except ValueError as error:
        raise BadInput(str(error)) from None


def parse_domain(name: str) -> str:
    address = normalise(f"x@{name.strip()}")
    if address is None or not name.strip() or "@" in name:
        raise BadInput(f"malformed domain {name!r}")
    domain = split_address(address)[1]
    if "." not in domain and not domain.startswith("["):
        raise BadInput(f"malformed domain {name!r} (expected a fully qualified name)")
    return domain


def parse_entries(lines: Iterable[str], default_action: Action | None,
                  source: str = "input", *, strict: bool = True) -> list[Entry]:
    """Bulk input: one address per line, optionally followed by an action; blank lines
    and lines starting with ``#`` are skipped.  All errors are collected and reported together."""
    entries: list[Entry] = []
    errors: list[str] = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        action = default_action
        address = line
        if len(parts) == 2:
            try:
                action = Action.from_name(parts[1])
                address = parts[0]
            except ValueError:
                if normalise(line) is None:
                    errors.append(f"{source} line {number}: {line!r}: bad action "
                                  f"{parts[1]!r} (allowed: "
                                  f"{', '.join(a.label for a in Action)})")
                    continue
        try:
            email, original = parse_address(address, strict=strict)
        except BadInput as error:
            errors.append(f"{source} line {number}: {error}")
            continue
        entries.append(Entry(email, original, action))
    if errors:
        shown = errors[:20]
        more = f"\n... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise BadInput("\n".join(shown) + more)
    return entries


def entries_from(addresses: Iterable[str], action: Action | None, *,
                 strict: bool = True) -> list[Entry]:
    out = []
    for text in addresses:
        email, original = parse_address(text, strict=strict)
        out.append(Entry(email, original, action))
    return out


def _dedupe(entries: Sequence[Entry]) -> list[Entry]:
    seen: dict[str, Entry] = {}
    for entry in entries:
        previous = seen.get(entry.email)
        if previous is None:
            seen[entry.email] = entry
        elif previous.action != entry.action:
            raise BadInput(f"{entry.email} is given twice with different actions "
                           f"({action_label(previous.action)} and {action_label(entry.action)})")
    return list(seen.values())


def action_label(action: Action | None) -> str:
    """An action for people: its name, or "list default" for None."""
    return "list default" if action is None else action.label


def chunks(items: Sequence, size: int = CHUNK) -> Iterator[Sequence]:
    """``items`` in slices of ``size`` (an IN list per statement stays bounded)."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


# --- domains -----------------------------------------------------------------------------


def find_domain(session: Session, name: str) -> Domain:
    domain = session.scalar(select(Domain).where(Domain.name == parse_domain(name)))
    if domain is None:
        raise NotFound(f"no domain {name.strip().lower()}")
    return domain


def add_domain(session: Session, name: str, alias_of: str | None = None) -> Domain:
    domain = parse_domain(name)
    if session.scalar(select(Domain.id).where(Domain.name == domain)) is not None:
        raise AlreadyExists(f"domain {domain}")
    host_id = None
    if alias_of is not None:
        host = find_domain(session, alias_of)
        if host.alias_of_id is not None:
            raise BadInput(f"{host.name} is itself an alias domain; "
                           "an alias must point at a mail host")
        host_id = host.id
    row = Domain(name=domain, alias_of_id=host_id)
    session.add(row)
    session.flush()
    return row


def remove_domain(session: Session, name: str) -> list[str]:
    """Remove a domain and its alias domains; refuse while lists live on it.
    Returns the alias domains removed with it."""
    domain = find_domain(session, name)
    lists = session.scalars(
        select(MailingList.posting_address).where(MailingList.domain_id == domain.id)
        .order_by(MailingList.posting_address)
    ).all()
    if lists:
        raise BadInput(f"domain {domain.name} still has lists: {', '.join(lists)}; "
                       "remove them first")
    aliases = session.scalars(
        select(Domain.name).where(Domain.alias_of_id == domain.id).order_by(Domain.name)
    ).all()
    session.execute(delete(Domain).where(Domain.alias_of_id == domain.id))
    session.execute(delete(Domain).where(Domain.id == domain.id))
    return list(aliases)


def domains(session: Session) -> list[tuple[str, str | None]]:
    """(name, mail host it is an alias of, or None), mail hosts first."""
    host = Domain.__table__.alias("host")
    rows = session.execute(
        select(Domain.name, host.c.name)
        .select_from(Domain.__table__.outerjoin(host, Domain.alias_of_id == host.c.id))
    ).all()
    return sorted(((name, alias) for name, alias in rows),
                  key=lambda r: (r[1] or r[0], r[1] is not None, r[0]))


# --- lists -------------------------------------------------------------------------------


# The settings of the rules that read the message (columns of ``lists``, migration 0003).
CONTENT_SETTINGS = ("moderator_password", "header_matches", "max_message_size",
                    "max_num_recipients", "require_explicit_destination",
                    "acceptable_aliases", "administrivia", "bounce_matching_headers",
                    "newsgroup_moderated", "dmarc_mitigate_action",
                    "dmarc_mitigate_unconditionally", "dmarc_addresses", "dmarc_quarantine")
LIST_SETTINGS = ("display_name", "mode", "emergency", "default_member_action",
                 "default_nonmember_action", "rejection_notice") + CONTENT_SETTINGS \
    + ("smtp_moderation",)


def content_spec(values: dict) -> dict:
    """``ListSpec`` keywords from the content columns of one ``lists`` row."""
    matches = []
    for entry in json.loads(values.get("header_matches") or "[]"):
        header, pattern, action = entry
        matches.append((header, pattern, None if action is None else Action.from_name(action)))
    return {
        "moderator_password": values.get("moderator_password") or None,
        "header_matches": tuple(matches),
        "max_message_size": values.get("max_message_size") or 0,
        "max_num_recipients": values.get("max_num_recipients") or 0,
        "require_explicit_destination": bool(values.get("require_explicit_destination")),
        # Lower-cased as Mailman's AcceptableAliasSet.add stores them (a regex's \S
        # becomes \s there too): rows written before policyd did the same read alike.
        "acceptable_aliases": tuple(line.lower() for line in (
            values.get("acceptable_aliases") or "").splitlines() if line),
        "administrivia": bool(values.get("administrivia")),
        "bounce_matching_headers": values.get("bounce_matching_headers") or "",
        "newsgroup_moderated": bool(values.get("newsgroup_moderated")),
        "dmarc_mitigate_action": values.get("dmarc_mitigate_action") or 0,
        "dmarc_mitigate_unconditionally": bool(values.get("dmarc_mitigate_unconditionally")),
        "dmarc_addresses": tuple(line for line in (values.get("dmarc_addresses")
                                                   or "").splitlines() if line),
        "dmarc_quarantine": bool(values.get("dmarc_quarantine", True)),
    }


def _content_value(key: str, value):
    """Validate one content setting for storage (``set_list``)."""
    if key in ("require_explicit_destination", "administrivia", "newsgroup_moderated",
               "dmarc_mitigate_unconditionally", "dmarc_quarantine"):
        return bool(value)
    if key == "dmarc_mitigate_action":
        try:
            return int(DmarcAction(value) if isinstance(value, int)
                       else DmarcAction.from_name(value))
        except ValueError as error:
            raise BadInput(str(error)) from None
    if key == "dmarc_addresses":
        items = value if isinstance(value, (list, tuple)) else (value or "").splitlines()
        for item in items:
            if item.strip().startswith("^"):
                try:
                    re.compile(item.strip())
                except re.error as error:
                    raise BadInput(f"dmarc address pattern {item.strip()!r}: {error}") \
                        from None
        return "\n".join(item.strip() for item in items if item.strip()) or None
    if key in ("max_message_size", "max_num_recipients"):
        number = int(value)
        if number < 0:
            raise BadInput(f"{key.replace('_', ' ')}: 0 (off) or a positive number")
        return number
    if key == "moderator_password":
        # Only ever a hash: policyctl hashes what it reads from the prompt or stdin.
        if value and not str(value).startswith("$"):
            raise BadInput("moderator password: store a passlib hash, not the password")
        return value or None
    if key == "header_matches":
        entries = value if isinstance(value, (list, tuple)) else json.loads(value or "[]")
        out = []
        for header, pattern, action in entries:
            try:
                re.compile(pattern)
            except re.error as error:
                raise BadInput(f"header match pattern {pattern!r}: {error}") from None
            if action is not None and Action.from_name(action) is Action.DEFER:
                raise BadInput("a header match action is accept, hold, reject or discard")
            out.append([header, pattern, None if action is None
                        else Action.from_name(action).label])
        return json.dumps(out) if out else None
    if key == "acceptable_aliases":
        items = value if isinstance(value, (list, tuple)) else (value or "").splitlines()
        aliases = [item.strip().lower() for item in items if item.strip()]
        for alias in aliases:
            # Mailman's AcceptableAliasSet.add: a regex (^...) or an address, lower-cased.
            if not (alias.startswith("^") or "@" in alias):
                raise BadInput(f"acceptable alias {alias!r}: neither a regular expression "
                               "(^...) nor an address (Mailman refuses it)")
        return "\n".join(aliases) or None
    return value or None


def find_list(session: Session, ref: str) -> MailingList:
    """A list by posting address (any case) or by list-id (``name.mail.host``)."""
    text = ref.strip()
    if "@" in text:
        address = normalise(text)
        if address is None:
            raise BadInput(f"malformed list address {ref!r}")
        row = session.scalar(select(MailingList).where(MailingList.posting_address == address))
    else:
        row = session.scalar(select(MailingList).where(MailingList.list_id == text.lower()))
    if row is None:
        raise NotFound(f"no list {text}")
    return row


def add_list(session: Session, address: str, *, display_name: str | None = None,
             mode: Mode = Mode.MAILMAN3, emergency: bool = False,
             default_member_action: Action = Action.DEFER,
             default_nonmember_action: Action = Action.HOLD,
             rejection_notice: str | None = None, list_id: str | None = None,
             create_domain: bool = True) -> tuple[MailingList, bool]:
    """Create a list; returns it and whether its domain was created with it."""
    posting, _ = parse_address(address)
    name, host = split_address(posting)
    if not _LIST_NAME.match(name):
        raise BadInput(f"bad list name {name!r} (allowed: letters, digits, '.', '_', '=', '-';"
                       " no '+')")
    existing = session.scalar(select(MailingList.id).where(MailingList.posting_address == posting))
    if existing is not None:
        raise AlreadyExists(f"list {posting}")
    list_id = (list_id or f"{name}.{host}").strip().lower()
    if not list_id or "@" in list_id or len(list_id) > ADDRESS_LENGTH:
        raise BadInput(f"bad list-id {list_id!r}")
    if session.scalar(select(MailingList.id).where(MailingList.list_id == list_id)) is not None:
        raise BadInput(f"list-id {list_id} is taken already")
    domain = session.scalar(select(Domain).where(Domain.name == host))
    created = False
    if domain is None:
        if not create_domain:
            raise NotFound(f"no domain {host}")
        domain = Domain(name=host)
        session.add(domain)
        session.flush()
        created = True
    elif domain.alias_of_id is not None:
        main = session.get(Domain, domain.alias_of_id)
        raise BadInput(f"{host} is an alias of {main.name}; create the list on {main.name}")
    row = MailingList(
        domain_id=domain.id, list_name=name, posting_address=posting, list_id=list_id,
        display_name=_display_name(display_name, name), mode=Mode(mode),
        emergency=bool(emergency), default_member_action=Action(default_member_action),
        default_nonmember_action=Action(default_nonmember_action),
        rejection_notice=_notice(rejection_notice),
    )
    session.add(row)
    session.flush()
    return row, created


def _display_name(value: str | None, name: str) -> str:
    if value is None or not value.strip():
        return name.capitalize()
    if len(value) > 255 or any(ch in value for ch in "\r\n\x00"):
        raise BadInput("display name: one line of at most 255 characters")
    return value.strip()


def _notice(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    if any(ch in value for ch in "\r\n\x00"):
        raise BadInput("rejection notice: one line of text (it becomes the SMTP reply)")
    return value.strip()


def set_list(session: Session, ref: str, **changes) -> MailingList:
    """Change settings (keys of ``LIST_SETTINGS``; ``rejection_notice=""`` clears it)."""
    row = find_list(session, ref)
    unknown = set(changes) - set(LIST_SETTINGS)
    if unknown:
        raise BadInput(f"unknown list setting(s): {', '.join(sorted(unknown))} "
                       f"(allowed: {', '.join(LIST_SETTINGS)})")
    if not changes:
        raise BadInput("nothing to change")
    for key, value in changes.items():
        if key == "display_name":
            value = _display_name(value, row.list_name)
        elif key == "rejection_notice":
            value = _notice(value)
        elif key == "mode":
            value = Mode(value)
        elif key == "emergency":
            value = bool(value)
        elif key in CONTENT_SETTINGS:
            value = _content_value(key, value)
        elif key == "smtp_moderation":
            try:
                value = SmtpModeration.from_name(str(value)).value
            except ValueError as error:
                raise BadInput(str(error)) from None
        else:
            value = Action(value)
        setattr(row, key, value)
    session.flush()
    return row


def remove_list(session: Session, ref: str) -> MailingList:
    row = find_list(session, ref)
    for model in (Membership, NonmemberPattern, Ban):
        session.execute(delete(model).where(model.list_id == row.id))
    session.execute(delete(MailingList).where(MailingList.id == row.id))
    return row


def all_lists(session: Session) -> list[MailingList]:
    return list(session.scalars(select(MailingList).order_by(MailingList.posting_address)))


def list_counts(session: Session, row: MailingList) -> dict[str, int]:
    counts = {role.label: 0 for role in MemberRole}
    for role, count in session.execute(
        select(Membership.role, func.count()).where(Membership.list_id == row.id)
        .group_by(Membership.role)
    ):
        counts[MemberRole(role).label] = count
    counts["patterns"] = session.scalar(
        select(func.count()).select_from(NonmemberPattern)
        .where(NonmemberPattern.list_id == row.id))
    counts["bans"] = session.scalar(
        select(func.count()).select_from(Ban).where(Ban.list_id == row.id))
    return counts


# --- addresses and users -----------------------------------------------------------------


def ensure_addresses(session: Session, entries: Sequence[Entry]) -> dict[str, int]:
    """Address ids for every entry, creating the missing addresses (executemany)."""
    ids: dict[str, int] = {}
    emails = [entry.email for entry in entries]
    for chunk in chunks(emails):
        ids.update(session.execute(
            select(Address.email, Address.id).where(Address.email.in_(chunk))).all())
    missing = [{"email": e.email, "original": e.original}
               for e in entries if e.email not in ids]
    if missing:
        session.execute(insert(Address), missing)
        for chunk in chunks([row["email"] for row in missing]):
            ids.update(session.execute(
                select(Address.email, Address.id).where(Address.email.in_(chunk))).all())
    return ids


def find_user(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name.strip()))
    if user is None:
        raise NotFound(f"no user {name.strip()}")
    return user


def _user_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > ADDRESS_LENGTH or any(ch.isspace() for ch in name):
        raise BadInput(f"bad user name {name!r} (one word, at most {ADDRESS_LENGTH} characters)")
    return name


def get_or_create_user(session: Session, name: str) -> tuple[User, bool]:
    name = _user_name(name)
    user = session.scalar(select(User).where(User.name == name))
    if user is not None:
        return user, False
    user = User(name=name)
    session.add(user)
    session.flush()
    return user, True


def add_user(session: Session, name: str, entries: Sequence[Entry],
             display_name: str | None = None) -> User:
    name = _user_name(name)
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise AlreadyExists(f"user {name}")
    user = User(name=name, display_name=(display_name or "").strip() or None)
    session.add(user)
    session.flush()
    link_addresses(session, user, entries)
    return user


def link_addresses(session: Session, user: User, entries: Sequence[Entry]) -> list[str]:
    """Make the addresses the user's (creating them); the first becomes the preferred
    address if the user has none.  An address of another user is ``BadInput``."""
    entries = _dedupe(entries)
    if not entries:
        return []
    ids = ensure_addresses(session, entries)
    owners = {}
    for chunk in chunks(list(ids.values())):
        owners.update(session.execute(
            select(Address.id, Address.user_id).where(Address.id.in_(chunk))).all())
    taken = sorted(email for email, id_ in ids.items()
                   if owners.get(id_) not in (None, user.id))
    if taken:
        raise BadInput(f"already linked to another user: {', '.join(taken)}")
    new = [ids[e.email] for e in entries if owners.get(ids[e.email]) is None]
    for chunk in chunks(new):
        session.execute(update(Address).where(Address.id.in_(chunk)).values(user_id=user.id))
    if user.preferred_address_id is None:
        user.preferred_address_id = ids[entries[0].email]
    session.flush()
    return [e.email for e in entries if ids[e.email] in new]


def unlink_addresses(session: Session, emails: Sequence[str]) -> None:
    rows = session.execute(select(Address.id, Address.email, Address.user_id)
                           .where(Address.email.in_(list(emails)))).all()
    found = {email: (id_, user_id) for id_, email, user_id in rows}
    missing = [e for e in emails if found.get(e, (None, None))[1] is None]
    if missing:
        raise NotFound(f"not linked to a user: {', '.join(missing)}")
    ids = [found[e][0] for e in emails]
    session.execute(update(User).where(User.preferred_address_id.in_(ids))
                    .values(preferred_address_id=None))
    session.execute(update(Address).where(Address.id.in_(ids)).values(user_id=None))


def set_preferred(session: Session, user: User, email: str) -> None:
    address = session.scalar(select(Address).where(Address.email == email))
    if address is None or address.user_id != user.id:
        raise BadInput(f"{email} is not an address of user {user.name}")
    user.preferred_address_id = address.id
    session.flush()


def remove_user(session: Session, name: str) -> User:
    user = find_user(session, name)
    session.execute(delete(Membership).where(Membership.user_id == user.id))
    session.execute(update(Address).where(Address.user_id == user.id).values(user_id=None))
    session.execute(delete(User).where(User.id == user.id))
    return user


def user_info(session: Session, user: User) -> dict:
    addresses = session.execute(
        select(Address.id, Address.email, Address.original).where(Address.user_id == user.id)
        .order_by(Address.id)).all()
    preferred = next((email for id_, email, _ in addresses
                      if id_ == user.preferred_address_id), None)
    subscriptions = session.execute(
        select(MailingList.posting_address, Membership.role, Membership.moderation_action)
        .join(MailingList, MailingList.id == Membership.list_id)
        .where(Membership.user_id == user.id)
        .order_by(MailingList.posting_address, Membership.role)).all()
    return {
        "name": user.name,
        "display_name": user.display_name,
        "preferred_address": preferred,
        "addresses": [email for _, email, _ in addresses],
        "subscriptions": [
            {"list": posting, "role": MemberRole(role).label,
             "action": action_label(None if action is None else Action(action))}
            for posting, role, action in subscriptions],
    }


def all_users(session: Session) -> list[tuple[str, int]]:
    return [(name, count) for name, count in session.execute(
        select(User.name, func.count(Address.id))
        .select_from(User).outerjoin(Address, Address.user_id == User.id)
        .group_by(User.id, User.name).order_by(User.name))]


# --- memberships -------------------------------------------------------------------------


def add_members(session: Session, mlist: MailingList, entries: Sequence[Entry],
                role: MemberRole = MemberRole.MEMBER,
                user: User | None = None) -> tuple[list[str], list[str]]:
    """Subscribe addresses directly (bulk); with ``user``, link them to that user first.
    Returns (added, already subscribed with that role); existing ones are left as they
    are."""
    entries = _dedupe(entries)
    if user is not None:
        link_addresses(session, user, entries)
    ids = ensure_addresses(session, entries)
    present: set[int] = set()
    for chunk in chunks(list(ids.values())):
        present.update(session.scalars(
            select(Membership.address_id).where(
                Membership.list_id == mlist.id, Membership.role == role,
                Membership.address_id.in_(chunk))))
    rows = [{"list_id": mlist.id, "address_id": ids[e.email], "user_id": None,
             "role": role, "moderation_action": e.action}
            for e in entries if ids[e.email] not in present]
    if rows:
        session.execute(insert(Membership), rows)
    added = [e.email for e in entries if ids[e.email] not in present]
    existing = [e.email for e in entries if ids[e.email] in present]
    return added, existing


def subscribe_user(session: Session, mlist: MailingList, user: User,
                   role: MemberRole = MemberRole.MEMBER,
                   action: Action | None = None) -> bool:
    """Subscribe a user through its preferred address (Mailman 3's user membership).
    Returns False if it was subscribed already."""
    if user.preferred_address_id is None:
        raise BadInput(f"user {user.name} has no preferred address to subscribe with")
    existing = session.scalar(select(Membership.id).where(
        Membership.list_id == mlist.id, Membership.user_id == user.id,
        Membership.role == role))
    if existing is not None:
        return False
    session.execute(insert(Membership).values(list_id=mlist.id, user_id=user.id, role=role,
                                              moderation_action=action))
    return True


def _membership_ids(session: Session, mlist: MailingList, emails: Sequence[str],
                    role: MemberRole) -> dict[str, list[int]]:
    """Membership ids per email: the direct membership, else a user membership whose
    preferred address it is."""
    found: dict[str, list[int]] = {}
    for chunk in chunks(list(emails)):
        for email, id_ in session.execute(
            select(Address.email, Membership.id)
            .join(Membership, Membership.address_id == Address.id)
            .where(Membership.list_id == mlist.id, Membership.role == role,
                   Address.email.in_(chunk))):
            found.setdefault(email, []).append(id_)
    rest = [e for e in emails if e not in found]
    for chunk in chunks(rest):
        for email, id_ in session.execute(
            select(Address.email, Membership.id)
            .join(User, User.preferred_address_id == Address.id)
            .join(Membership, Membership.user_id == User.id)
            .where(Membership.list_id == mlist.id, Membership.role == role,
                   Address.email.in_(chunk))):
            found.setdefault(email, []).append(id_)
    return found


def _require_memberships(session, mlist, entries, role) -> list[int]:
    emails = [e.email for e in _dedupe(entries)]
    found = _membership_ids(session, mlist, emails, role)
    missing = [e for e in emails if e not in found]
    if missing:
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more"
                                           if len(missing) > 20 else "")
        raise NotFound(f"not {_article(role)} of {mlist.posting_address}: {shown}")
    return [id_ for ids in found.values() for id_ in ids]


def _article(role: MemberRole) -> str:
    return f"an {role.label}" if role.label[0] in "aeiou" else f"a {role.label}"


def remove_members(session: Session, mlist: MailingList, entries: Sequence[Entry],
                   role: MemberRole = MemberRole.MEMBER) -> int:
    ids = _require_memberships(session, mlist, entries, role)
    for chunk in chunks(ids):
        session.execute(delete(Membership).where(Membership.id.in_(chunk)))
    return len(ids)


def set_members(session: Session, mlist: MailingList, entries: Sequence[Entry],
                role: MemberRole = MemberRole.MEMBER) -> int:
    """Set each entry's moderation action (``None`` = the list default)."""
    entries = _dedupe(entries)
    ids = _require_memberships(session, mlist, entries, role)
    by_action: dict[Action | None, list[str]] = {}
    for entry in entries:
        by_action.setdefault(entry.action, []).append(entry.email)
    for action, emails in by_action.items():
        found = _membership_ids(session, mlist, emails, role)
        for chunk in chunks([id_ for ids_ in found.values() for id_ in ids_]):
            session.execute(update(Membership).where(Membership.id.in_(chunk))
                            .values(moderation_action=action))
    return len(ids)


def members(session: Session, mlist: MailingList,
            role: MemberRole = MemberRole.MEMBER) -> list[dict]:
    direct = session.execute(
        select(Address.email, Address.original, Membership.moderation_action)
        .join(Membership, Membership.address_id == Address.id)
        .where(Membership.list_id == mlist.id, Membership.role == role)).all()
    through_user = session.execute(
        select(Address.email, Address.original, Membership.moderation_action, User.name)
        .join(User, User.preferred_address_id == Address.id)
        .join(Membership, Membership.user_id == User.id)
        .where(Membership.list_id == mlist.id, Membership.role == role)).all()
    out = [{"address": email, "original": original, "action": action, "user": None}
           for email, original, action in direct]
    out += [{"address": email, "original": original, "action": action, "user": name}
            for email, original, action, name in through_user]
    out.sort(key=lambda m: (m["address"], m["user"] or ""))
    return out


# --- nonmember patterns ------------------------------------------------------------------


def parse_kind(name: str) -> Action:
    action = parse_action(name)
    if action not in PATTERN_KINDS:
        raise BadInput(f"bad pattern kind {name!r} (allowed: accept, hold, reject, discard)")
    return action


def check_pattern(text: str, *, ban: bool = False) -> str:
    """Validate an entry: ``^regex`` must compile, ``@list`` (not for bans) must name a
    list address, anything else is an address (stored normalised)."""
    text = text.strip()
    if not text:
        raise BadInput("empty pattern")
    if len(text) > PATTERN_LENGTH:
        raise BadInput(f"pattern longer than {PATTERN_LENGTH} characters")
    if any(ch in text for ch in "\r\n\x00"):
        raise BadInput("pattern: one line of text")
    if text.startswith("^"):
        try:
            re.compile(text)
        except re.error as error:
            raise BadInput(f"bad regular expression {text!r}: {error}") from None
        return text
    if text.startswith("@") and not ban:
        if normalise(text[1:]) is None:
            raise BadInput(f"bad list reference {text!r} (expected @list@domain)")
        return "@" + normalise(text[1:])
    return parse_address(text)[0]


def add_pattern(session: Session, mlist: MailingList, kind: Action, text: str,
                position: int | None = None) -> int:
    """Append (or insert at 1-based ``position``); returns the entry's position."""
    text = check_pattern(text)
    where = (NonmemberPattern.list_id == mlist.id, NonmemberPattern.kind == kind)
    if session.scalar(select(NonmemberPattern.id).where(
            *where, NonmemberPattern.pattern == text)) is not None:
        raise AlreadyExists(f"entry {text!r} in {kind.label}_these_nonmembers of "
                            f"{mlist.posting_address}")
    rows = session.execute(select(NonmemberPattern.id).where(*where)
                           .order_by(NonmemberPattern.position, NonmemberPattern.id)).all()
    count = len(rows)
    if position is None or position > count:
        position = count + 1
    if position < 1:
        raise BadInput("position must be 1 or more")
    # Renumber 1..n leaving a gap at ``position``.
    for index, (id_,) in enumerate(rows, 1):
        new = index if index < position else index + 1
        session.execute(update(NonmemberPattern).where(NonmemberPattern.id == id_)
                        .values(position=new))
    session.execute(insert(NonmemberPattern).values(
        list_id=mlist.id, kind=kind, position=position, pattern=text))
    return position


def remove_pattern(session: Session, mlist: MailingList, kind: Action, text: str) -> None:
    stripped = text.strip()
    candidates = {stripped}
    try:
        candidates.add(check_pattern(stripped))
    except BadInput:
        pass
    result = session.execute(delete(NonmemberPattern).where(
        NonmemberPattern.list_id == mlist.id, NonmemberPattern.kind == kind,
        NonmemberPattern.pattern.in_(sorted(candidates))))
    if result.rowcount == 0:
        raise NotFound(f"{stripped!r} is not in {kind.label}_these_nonmembers of "
                       f"{mlist.posting_address}")


def patterns(session: Session, mlist: MailingList,
             kind: Action | None = None) -> list[tuple[Action, int, str]]:
    query = select(NonmemberPattern.kind, NonmemberPattern.position, NonmemberPattern.pattern
                   ).where(NonmemberPattern.list_id == mlist.id)
    if kind is not None:
        query = query.where(NonmemberPattern.kind == kind)
    rows = session.execute(query.order_by(NonmemberPattern.position, NonmemberPattern.id)).all()
    order = {k: i for i, k in enumerate(PATTERN_KINDS)}
    return sorted(((Action(k), p, t) for k, p, t in rows), key=lambda r: order[r[0]])


# --- bans --------------------------------------------------------------------------------


def _ban_where(mlist: MailingList | None):
    return Ban.list_id.is_(None) if mlist is None else Ban.list_id == mlist.id


def add_ban(session: Session, mlist: MailingList | None, text: str) -> str:
    text = check_pattern(text, ban=True)
    if session.scalar(select(Ban.id).where(_ban_where(mlist), Ban.pattern == text)) is not None:
        where = "site-wide" if mlist is None else f"on {mlist.posting_address}"
        raise AlreadyExists(f"ban {text!r} {where}")
    session.execute(insert(Ban).values(list_id=mlist.id if mlist else None, pattern=text))
    return text


def remove_ban(session: Session, mlist: MailingList | None, text: str) -> None:
    stripped = text.strip()
    candidates = {stripped}
    try:
        candidates.add(check_pattern(stripped, ban=True))
    except BadInput:
        pass
    result = session.execute(delete(Ban).where(_ban_where(mlist),
                                               Ban.pattern.in_(sorted(candidates))))
    if result.rowcount == 0:
        where = "site-wide" if mlist is None else f"on {mlist.posting_address}"
        raise NotFound(f"{stripped!r} is not banned {where}")


def bans(session: Session, mlist: MailingList | None) -> list[str]:
    return list(session.scalars(select(Ban.pattern).where(_ban_where(mlist)).order_by(Ban.id)))


# --- overview ----------------------------------------------------------------------------


def totals(session: Session) -> dict[str, int]:
    out = {}
    for name, model in (("domains", Domain), ("lists", MailingList), ("users", User),
                        ("addresses", Address), ("memberships", Membership),
                        ("patterns", NonmemberPattern), ("bans", Ban)):
        out[name] = session.scalar(select(func.count()).select_from(model))
    return out
