"""The daemon's runtime tuning, switched on in one place (``[runtime]`` in the config).

Each part lives in its own module and says there why it exists:

=================  =========================================================  ============
part               what                                                       switch
=================  =========================================================  ============
``reactor``        epoll reactor without the legacy log context per event,    ``reactor``
                   reporting its turns to ``pacing`` (``policyd`` command;
                   ``twist --reactor=policyd``)
``fastio``         a Postfix answer sent at once, not on the next turn, an    ``fast_write``,
                   Exim answer sent and its connection closed in the same
                   turn; Unix sockets read with ``recv``, not ``recvmsg``;    ``fast_read``,
                   the Postfix answers (and Exim's made at accept) of one     ``turn_writes``
                   turn sent together at its end (with the daemon's reactor
                   and ``fast_write``)
``fastaccept``     an Exim request that is whole when its connection is       ``fast_accept``
                   accepted answered there, without a transport
``pacing``         the snapshot builder rests while the reactor is busy       ``pacing``
``heap``           no cyclic GC during builds, ``gc.freeze`` after the first  ``heap``
                   load, then collections from the reactor at fixed times,
                   old snapshots freed piecewise, ``malloc_trim``
``threads``        the store thread's niceness, the switch interval           ``store_niceness``,
                                                                              ``switch_interval``
``monotonic``      the reactor's timers on the monotonic clock, not the wall  always
                   clock (``reactor.install``, ``policyd.tap.makeService``)
=================  =========================================================  ============

A part that depends on private code of Twisted checks at start-up that the code is the
one it was written against; if not, it steps aside and ``notes`` say why (logged).
"""

from __future__ import annotations

from contextlib import ExitStack

from twisted.logger import Logger

from . import fastaccept, fastio, heap, pacing, threads

__all__ = ["Tuning"]

log = Logger(namespace="policyd.runtime")


class Tuning:
    """What ``[runtime]`` switches on for one daemon (``policyd.tap.makeService``)."""

    def __init__(self, config, notes: list[str] | None = None, clock=None) -> None:
        self.config = config
        self.collector = heap.ReactorCollector(clock) if clock is not None else None
        self.notes = list(notes or ())
        self.fast_write = self._checked("fast_write", config.fast_write, fastio.available,
                                        fastio.write_now)
        self.read_plainly = self._checked("fast_read", config.fast_read,
                                          fastio.reads_available, fastio.read_plainly)
        self.answer_on_accept = self._checked("fast_accept", config.fast_accept,
                                              fastaccept.available,
                                              fastaccept.answer_on_accept)
        # Only the daemon's reactor opens a turn (``runtime.reactor``); with another one
        # (``twist`` without ``--reactor=policyd``, whose note says so) nothing is held.
        self.turn_writes = (getattr(config, "turn_writes", False)
                            and self.fast_write is not None
                            and hasattr(clock, "turn_writes"))
        if self.turn_writes:
            clock.turn_writes = True
        self._stack = ExitStack()

    def _checked(self, switch: str, on: bool, check, part):
        """``part`` when ``switch`` is on and ``check()`` finds the running Twisted as the
        part was written for; else ``None``, and a note why when it was on."""
        if not on:
            return None
        why = check()
        if why is not None:
            self.notes.append(f"{switch} off: {why}")
            return None
        return part

    def apply_to_factory(self, factory) -> None:
        """Answers of this listener go out through ``fastio`` where ``fast_write`` is on:
        at once where connections stay open (Postfix; at the end of the reactor's turn
        where ``turn_writes`` is on too), sent and closed in the same turn
        where the answer ends the connection (Exim); its Unix sockets read with ``recv``
        where ``fast_read`` is on; a request whole at accept answered there where
        ``fast_accept`` is on (Exim).  ``Listener`` calls ``tune_port`` before the first
        accept."""
        tuners = []
        if self.read_plainly is not None:
            tuners.append(self.read_plainly)
        if self.fast_write is not None:
            if getattr(factory, "answers_stay_open", False):
                factory.write = self.fast_write
                if self.turn_writes:
                    tuners.append(fastio.hold_for_turn)
            elif getattr(factory, "closes_after_answer", False):
                factory.finish = fastio.send_and_close
                tuners.append(fastio.close_after_answer)
        if self.answer_on_accept is not None and callable(
                getattr(factory, "answer_first", None)):
            tuners.append(self.answer_on_accept)
        if len(tuners) == 1:
            factory.tune_port = tuners[0]
        elif tuners:
            factory.tune_port = _each(tuners)

    def daemon_starting(self) -> None:
        pacing.enabled = self.config.pacing
        heap.enabled = self.config.heap
        self._stack.enter_context(threads.switch_interval(self.config.switch_interval))
        for note in self.notes:
            log.warn("runtime tuning: {note}", note=note)

    def first_load_done(self) -> None:
        heap.settle()
        if self.collector is not None:
            self.collector.start()

    def daemon_stopped(self) -> None:
        if self.collector is not None:
            self.collector.stop()
        self._stack.close()


def _each(tuners):
    """One ``tune_port`` that applies ``tuners`` in order."""
    def tune_port(port) -> None:
        for tune in tuners:
            tune(port)
    return tune_port
