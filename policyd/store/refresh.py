"""The incremental refresh, one algorithm for every backend.

A full build of a large store takes seconds; most changes touch one list.  Each snapshot
carries a ``SourceState`` (``Snapshot.source_state``): per list row id, the list's posting
address and a *fingerprint* (the native store: the list's revision, kept by database
triggers; Mailman 3: digests of its rows), and one fingerprint of what every list shares
(domains, site bans, ...).  When the store's change token moves, ``load_changes`` asks the
backend's ``Source`` for the current state, compares it with the one the previous snapshot
was built from, and either rebuilds only the lists whose fingerprint changed (swapped in
with ``snapshot.replace_lists``; ``@list`` references resolve at decision time, so the
unchanged lists stay valid) or does a full build.  A full build whenever:

* the previous snapshot has no state of this store (another backend, another database,
  a replaced SQLite file);
* what lists share changed;
* no fingerprint explains the token's change (a change the backend cannot attribute: it
  must not be ignored);
* more than ``MAX_INCREMENTAL_LISTS`` lists changed (one full build is then cheaper).

``differences`` compares two snapshots by everything a decision reads: the periodic
verification build (``verify``, scheduled by ``VerificationSchedule``) uses it to check a
backend's incremental result against a full one.  Mailman 3 needs it because its change
detection is inferred; the native store because its triggers can be bypassed (a
PostgreSQL session with ``session_replication_role = replica``, a disabled or dropped
trigger).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Hashable, Iterable, Mapping, Protocol, Sequence, TypeVar

from ..runtime.pacing import pace
from ..core.snapshot import ListSpec, Snapshot, replace_lists

__all__ = ["MAX_INCREMENTAL_LISTS", "SourceState", "Source", "Plan", "plan", "prior_state",
           "load_changes", "verify", "VerificationSchedule", "content", "differences"]

MAX_INCREMENTAL_LISTS = 64


@dataclass(frozen=True)
class SourceState:
    """What a snapshot was built from (``Snapshot.source_state``)."""

    # The store it was read from (URL, plus the file's identity for SQLite): a state is
    # only ever compared with one of the same store.
    origin: str
    # list row id -> (posting address, fingerprint)
    lists: Mapping[int, tuple[str, Hashable]]
    # What every list depends on (domains, site bans, ...).
    shared: Hashable
    # Backend-specific bounds the next comparison needs (Mailman 3: the highest address
    # and user ids at this build).
    bounds: tuple = ()


@dataclass(frozen=True)
class Plan:
    """What an incremental refresh does: a full build, or rebuild ``changed`` (list row
    ids) and drop ``removed`` (posting addresses)."""

    full: bool
    changed: tuple[int, ...] = ()
    removed: tuple[str, ...] = ()
    reason: str = ""


class Source(Protocol):
    """A backend's reads, inside one consistent view of its store."""

    def read_state(self, prior: SourceState) -> tuple[SourceState, bool, Iterable[int]]:
        """(current state, whether what lists share is unchanged since ``prior``, list
        row ids that changed in a way their fingerprints cannot show)."""

    def full(self, state: SourceState) -> Snapshot:
        """A full build, carrying ``state``."""

    def lists(self, state: SourceState, changed: Sequence[int]
              ) -> tuple[list[ListSpec], Sequence[str]]:
        """(the specs of the lists ``changed``, problems found reading them, each
        ``"list <posting>: ..."``)."""


def prior_state(previous: Snapshot | None, origin: str) -> SourceState | None:
    """The previous snapshot's state if it was read from this store, else ``None``."""
    prior = None if previous is None else previous.source_state
    if isinstance(prior, SourceState) and prior.origin == origin:
        return prior
    return None


def plan(prior: SourceState, state: SourceState, shared_same: bool,
         also: Iterable[int] = ()) -> Plan:
    """Compare two states (see the module docstring)."""
    changed = {id_ for id_, entry in state.lists.items() if prior.lists.get(id_) != entry}
    changed.update(id_ for id_ in also if id_ in state.lists)
    removed = tuple(posting for id_, (posting, _) in prior.lists.items()
                    if state.lists.get(id_, ("",))[0] != posting)
    if not shared_same:
        return Plan(True, reason="shared data changed")
    if not (changed or removed):
        return Plan(True, reason="no list explains the change")
    if len(changed) > MAX_INCREMENTAL_LISTS:
        return Plan(True, reason=f"{len(changed)} lists changed")
    return Plan(False, tuple(sorted(changed)), removed)


def load_changes(previous: Snapshot, prior: SourceState, source: Source, *, version: str,
                 started: float | None = None) -> Snapshot:
    """The snapshot after a change: ``previous`` with only the changed lists rebuilt when
    that is provably enough, else a full build (``source.full``)."""
    started = time.time() if started is None else started
    state, shared_same, also = source.read_state(prior)
    steps = plan(prior, state, shared_same, also)
    if steps.full:
        return replace(source.full(state), built_how=f"full build: {steps.reason}")
    specs, problems = source.lists(state, steps.changed)
    snapshot = replace_lists(previous, specs, steps.removed, version=version,
                             built_at=started, source_state=state, pause=pace)
    snapshot = replace(snapshot, built_how=_incremental_how(steps))
    # replace_lists drops the rebuilt lists' own problems ("<posting>: ..."); the ones a
    # source reports while reading rows are "list <posting>: ...".
    gone = {f"list {posting}" for posting in steps.removed}
    gone.update(f"list {state.lists[i][0]}" for i in steps.changed)
    kept = tuple(p for p in snapshot.problems if p.split(":", 1)[0] not in gone)
    if problems or len(kept) != len(snapshot.problems):
        snapshot = replace(snapshot, problems=tuple(problems) + kept)
    return snapshot


def _incremental_how(steps: Plan) -> str:
    def lists(n: int) -> str:
        return f"{n} list{'' if n == 1 else 's'}"
    parts = []
    if steps.changed:
        parts.append(f"{lists(len(steps.changed))} read again")
    if steps.removed:
        parts.append(f"{lists(len(steps.removed))} removed")
    return "incremental: " + ", ".join(parts)


def verify(previous: Snapshot, prior: SourceState | None, source: Source, *, version: str,
           started: float | None = None) -> tuple[Snapshot, list[str]]:
    """A verification build, for a backend whose change detection is inferred: (a full
    build, how the snapshot the incremental path serves for this same state differs from
    it).  That snapshot is ``previous`` itself when the token has not moved since it
    (a change the token missed shows here), else ``load_changes`` from it."""
    if prior is None:
        state = source.read_state(SourceState("", {}, None))[0]
        return source.full(state), []
    if version == previous.version:
        incremental = previous
        state = source.read_state(prior)[0]
    else:
        incremental = load_changes(previous, prior, source, version=version, started=started)
        state = incremental.source_state
    full = source.full(state)
    return full, differences(incremental, full)


T = TypeVar("T")


class VerificationSchedule:
    """When a backend's next verification build (``verify``) is due: ``interval`` seconds
    (``[store] verify_interval``; 0: never) after its last full build or failed
    verification build.  A backend calls ``built()`` from every full build and runs its
    verification builds through ``attempt``."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last_full = time.monotonic()
        # Whether the last verification build failed (no full build since).
        self.failed = False

    def due(self, always: bool = False) -> bool:
        """``always``: due at every refresh (a backend that knows its change detection
        is broken), unless the last attempt failed: then ``interval`` after it."""
        if always and not self.failed:
            return True
        return self.interval > 0 and time.monotonic() - self.last_full >= self.interval

    def built(self) -> None:
        self.last_full = time.monotonic()
        self.failed = False

    def attempt(self, build: Callable[[], T]) -> T:
        """``build()``; a failure counts as an attempt: retried at once, a build that
        fails for its size (a statement timeout on the big scan) would fail on every
        refresh, each costing the whole timeout."""
        try:
            return build()
        except Exception:
            self.last_full = time.monotonic()
            self.failed = True
            raise


# --- comparing snapshots -------------------------------------------------------------------


def _policy_content(policy) -> tuple:
    return (set(policy.members), dict(policy.member_actions), dict(policy.member_aliases),
            dict(policy.nonmembers),
            [(a, [p.text for p in ps]) for a, ps in policy.nonmember_patterns],
            policy.bans.exact, [p.text for p in policy.bans.patterns], policy.bans.invalid,
            policy.emergency,
            policy.default_member_action, policy.default_nonmember_action,
            policy.rejection_notice, policy.mode, policy.display_name, policy.list_id,
            policy.smtp_moderation)


def content(snapshot: Snapshot) -> dict:
    """Everything a decision reads from ``snapshot``, as plain comparable data."""
    return {
        "domains": dict(snapshot.domains),
        "site_bans": (snapshot.site_bans.exact,
                      [p.text for p in snapshot.site_bans.patterns],
                      snapshot.site_bans.invalid),
        "lists": {posting: _policy_content(policy)
                  for posting, policy in snapshot.lists.items()},
        "problems": sorted(snapshot.problems),
    }


def differences(incremental: Snapshot, full: Snapshot, limit: int = 5) -> list[str]:
    """How ``incremental`` differs from ``full`` (empty if they decide alike): what differs
    (``domains``, ``site bans``, ``problems``, or a list's posting address), at most
    ``limit`` items and a count of the rest."""
    a, b = content(incremental), content(full)
    found = []
    if a["domains"] != b["domains"]:
        found.append("domains")
    if a["site_bans"] != b["site_bans"]:
        found.append("site bans")
    for posting in sorted(set(a["lists"]) | set(b["lists"])):
        if a["lists"].get(posting) != b["lists"].get(posting):
            found.append(posting)
    if a["problems"] != b["problems"]:
        found.append("problems")
    if len(found) > limit:
        found = found[:limit] + [f"{len(found) - limit} more"]
    return found
