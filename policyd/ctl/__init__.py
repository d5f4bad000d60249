"""``policyctl``: the synchronous admin command line for the native store and the daemon.

Store commands (``init``, ``migrate``, ``import-mailman2``, ``domain``, ``list``,
``member``, ``nonmember``, ``user``, ``pattern``, ``ban``) run without a reactor, each in
one transaction: a command that fails writes nothing.  ``query`` asks the running daemon
over its control socket, or decides from the store itself with ``--offline``; ``status``
and ``reload`` talk to the daemon.

One module per command group, each with a ``register(commands)`` that adds its
subcommands and the handlers they run:

=============  ==================================================================
``cli``        the argument parser assembled from the groups; ``main``
``output``     the ``Context`` a handler gets (arguments, configuration, store,
               output streams), the shared output helpers, and ``run``: the one
               place errors become messages and exit codes
``arguments``  argument types and the flags several groups share
``store``      ``init``, ``migrate``, ``import-mailman2``
``lists``      ``domain``, ``list``
``members``    ``member``, ``nonmember``, ``user``
``patterns``   ``pattern``, ``ban``
``daemon``     ``query``, ``status``, ``reload``
``moderation`` ``pending``, ``approve``, ``reject``, ``discard`` (SMTP-time moderation)
=============  ==================================================================

Exit codes: 0 ok, 2 bad input (a duplicate too), 3 daemon unreachable, 4 not found,
5 store unavailable.
"""

from __future__ import annotations

from .cli import build_parser, main
from .output import run

__all__ = ["build_parser", "main", "run"]
