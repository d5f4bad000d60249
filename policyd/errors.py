"""The domain errors the store and ``policyctl`` raise, each with the exit code it maps to.

``policyctl`` turns these (and nothing else) into a message on stderr and an exit code, in
one place (``policyd.ctl.run``).  The daemon only ever sees ``StoreUnavailable`` (and
unexpected exceptions) from a backend, and answers its configured error action.

``Unavailable`` and ``ListenError`` are the daemon's own: no snapshot to decide a control
query on, and a listener that cannot start.
"""

from __future__ import annotations


class PolicydError(Exception):
    """Base class: a problem worded for the admin, with the exit code policyctl uses."""

    exit_code = 1


class BadInput(PolicydError):
    """Malformed address, bad action or setting name, duplicate entry, bad pattern."""

    exit_code = 2


class AlreadyExists(BadInput):
    """Adding what is there already (a domain, list, user, member, nonmember, pattern or
    ban): exit 2 like any bad input, worded the same way for every kind of object."""

    def __init__(self, what: str, *, plural: bool = False, detail: str = "") -> None:
        super().__init__(f"{what} {'exist' if plural else 'exists'} already"
                         + (f": {detail}" if detail else ""))


class DaemonUnreachable(PolicydError):
    """The daemon's control socket cannot be reached or answered nonsense."""

    exit_code = 3


class NotFound(PolicydError):
    """A list, domain, member, user, pattern or ban that does not exist."""

    exit_code = 4


class StoreUnavailable(PolicydError):
    """The store cannot be reached, is not initialised or has an outdated schema."""

    exit_code = 5


class Unavailable(PolicydError):
    """No snapshot to decide on (none yet, or an empty one): a query cannot be decided,
    and the MTAs get the configured 4xx."""

    exit_code = 5


class ListenError(Exception):
    """A listener could not start; the message names the configuration key."""
