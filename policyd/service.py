"""The running daemon: decisions on the live snapshot, listeners, start-up and shutdown.

``Decider`` is what every protocol calls: current snapshot + ``chain.decide`` + the
configured ``ReplyPolicy``, with the error policy (no snapshot yet, or any exception
inside the decision -> the configured 4xx, never a 5xx), the counters ``policyctl status``
shows, and one structured log line per decision.

``PolicyService`` composes the store thread, the ``SnapshotService``, one ``Listener``
per configured endpoint string and the control socket, and owns the order of start-up
(a failed bind aborts it, naming the configuration key) and shutdown (close the
listeners, let connections in flight finish within ``daemon.shutdown_grace``, stop the
refresh, close the store).
"""

from __future__ import annotations

import gc
import os
import sys
import signal
from collections import Counter
from time import perf_counter
from typing import Callable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.logger import Logger

from . import __version__
from .snapshot_service import SnapshotService, StoreThread
from .core.chain import decide as chain_decide
from .config import Config
from .errors import Unavailable
from .listeners import Listener
from .logging import FastLogger
from .core.replies import ReplyPolicy, SmtpReply
from .core.verdict import Decision, Query
from .wire import exim_reply_line, query_result

log = Logger(namespace="policyd")
decision_log = FastLogger(namespace="policyd.decision")

Render = Callable[[Decision | None, SmtpReply], str]


_WORDS = frozenset({"DUNNO", "OK"})


def _exim_render(decision, reply) -> str:
    return exim_reply_line(reply)


DECISION_FORMAT = ("{protocol} {verdict} list={list} sender=<{sender}> senders={senders} "
                   "rule={rule} reply={reply!r} {elapsed:.3f}ms{request}")


def log_decision_event(protocol, verdict, list_, sender, senders, decided_by, rule, reply,
                       elapsed, request_id) -> None:
    """The line per decision as a structured ``twisted.logger`` event."""
    decision_log.info(DECISION_FORMAT, protocol=protocol, verdict=verdict, list=list_,
                      sender=sender, senders=senders, decided_by=decided_by, rule=rule,
                      reply=reply, elapsed=elapsed,
                      request=f" id={request_id}" if request_id else "",
                      request_id=request_id)


class Decider:
    """Decide one query on the current snapshot, count it and log it."""

    def __init__(self, snapshots, policy: ReplyPolicy, *, log_decisions: bool = True,
                 decide=chain_decide) -> None:
        self.snapshots = snapshots
        self.policy = policy
        self.log_decisions = log_decisions
        self._decide = decide
        # Where the line per decision goes: a twisted.logger event by default; the daemon
        # hands in its log writer's direct path (the same line, a fraction of the cost).
        self.log_decision: Callable[..., None] = log_decision_event
        # protocol -> verdict (or error, unavailable, malformed, other-state) -> count
        self.by_protocol: dict[str, Counter] = {}
        # protocol -> what was answered (ACCEPT, REJECT, ..., or Postfix's DUNNO, OK)
        self.answers: dict[str, Counter] = {}

    def decide(self, query: Query, protocol: str, request_id: str | None = None,
               render: Render = _exim_render, count_answer: bool = True
               ) -> tuple[Decision | None, SmtpReply, str]:
        """Return ``(decision or None, reply, wire text)``; never raises for the query's
        sake: no snapshot or an error inside the decision gives the configured 4xx.

        ``count_answer=False`` when the caller sends something else (Exim's aggregate
        over several lists) and counts it with ``count_answer``."""
        started = perf_counter()
        snapshot = self.snapshots.current
        if snapshot is None:
            return self._trouble(query, protocol, request_id, render, count_answer, started,
                                 "unavailable", self.snapshots.unavailable_reason)
        try:
            # Without the trace: the MTA path never shows it (``policyctl query`` decides
            # afresh with it).
            decision = self._decide(snapshot, query, explain=False)
            reply = self.policy.reply(decision)
        except Exception:
            decision_log.failure("the decision failed for {protocol} recipient={recipient!r}"
                                 " sender={sender!r}", protocol=protocol,
                                 recipient=query.recipient, sender=query.envelope_sender)
            return self._trouble(query, protocol, request_id, render, count_answer, started,
                                 "error", "internal error in the decision (logged)")
        try:
            wire = render(decision, reply)
        except Exception:
            decision_log.failure("rendering the {protocol} answer failed", protocol=protocol)
            return self._trouble(query, protocol, request_id, render, count_answer, started,
                                 "error", "internal error rendering the answer")
        # ``_value_``: the member's plain attribute (``.value`` is a property, a Python
        # call per access on 3.11).
        label = decision.verdict._value_
        self.count(protocol, label, (wire if wire in _WORDS else reply.outcome._value_)
                   if count_answer else None)
        if self.log_decisions:
            self.log_decision(protocol, label, decision.list or query.recipient,
                              query.envelope_sender, ",".join(decision.senders) or "-",
                              decision.sender, decision.rule, wire,
                              (perf_counter() - started) * 1000.0, request_id)
        return decision, reply, wire

    def _trouble(self, query: Query, protocol: str, request_id, render: Render,
                 count_answer: bool, started: float, label: str, reason: str):
        """No snapshot, or an exception: the configured temporary failure."""
        reply = self.policy.error(reason)
        try:
            wire = render(None, reply)
        except Exception:
            decision_log.failure("rendering the {protocol} answer failed", protocol=protocol)
            wire = exim_reply_line(reply) if render is _exim_render else \
                f"{reply.code} {reply.status} {reply.text}"
        self.count(protocol, label, (wire if wire in _WORDS else reply.outcome._value_)
                   if count_answer else None)
        if self.log_decisions:
            (decision_log.warn if label == "error" else decision_log.info)(
                "{protocol} {verdict} list={list} sender=<{sender}> reason={reason!r} "
                "reply={reply!r} {elapsed:.3f}ms{request}",
                protocol=protocol, verdict=label, list=query.recipient,
                sender=query.envelope_sender, reason=reason, reply=wire,
                elapsed=(perf_counter() - started) * 1000.0,
                request=f" id={request_id}" if request_id else "", request_id=request_id,
            )
        return None, reply, wire

    def count(self, protocol: str, label: str, answer: str | None = None) -> None:
        """Count a verdict (or error, unavailable, malformed, other-state) and, unless
        ``None``, what was answered."""
        counts = self.by_protocol.get(protocol)
        if counts is None:
            counts = self.by_protocol[protocol] = Counter()
            self.answers[protocol] = Counter()
        counts[label] += 1
        if answer is not None:
            self.answers[protocol][answer] += 1

    def count_answer(self, protocol: str, answer: str) -> None:
        answers = self.answers.get(protocol)
        if answers is None:
            answers = self.answers[protocol] = Counter()
            self.by_protocol[protocol] = Counter()
        answers[answer] += 1

    def counters(self) -> dict:
        verdicts: Counter = Counter()
        for counts in self.by_protocol.values():
            verdicts.update(counts)
        return {
            "total": sum(verdicts.values()),
            "by_verdict": dict(verdicts),
            "by_protocol": {name: dict(counts) for name, counts in self.by_protocol.items()},
            "answers": {name: dict(counts) for name, counts in self.answers.items()},
        }


def settle_heap() -> None:
    """Once, before the first MTA connection: collect, then move everything alive (the
    imported modules of Twisted, SQLAlchemy and the rest, ~100,000 objects) out of the
    garbage collector's sight.  Every full collection would otherwise scan them all, a
    40 ms stall of the reactor a few times a minute under load.  Nothing transient is
    alive at that moment, so nothing cyclic is kept from collection later."""
    gc.collect()
    gc.freeze()


class PolicyService(Service):
    """The whole daemon as one Twisted service (what ``tap.makeService`` returns)."""

    def __init__(self, config: Config, reactor, backend, *, store_thread=None,
                 install_signals: bool = False, on_sighup: Callable[[], None] | None = None
                 ) -> None:
        from .protocols.control import ControlFactory
        from .protocols.exim import EximFactory
        from .protocols.postfix import PostfixFactory

        self.config = config
        self.reactor = reactor
        self.backend = backend
        self.install_signals = install_signals
        self.on_sighup = on_sighup
        self.store_thread = store_thread if store_thread is not None else StoreThread(reactor)
        self.snapshots = SnapshotService(
            backend, interval=config.store.refresh_interval, clock=reactor,
            run_in_thread=self.store_thread.run)
        self.decider = Decider(self.snapshots, config.smtp,
                               log_decisions=config.daemon.log_level in ("debug", "info"))
        self.started_at: float | None = None
        # One factory per listener, so each listener's open connections can be counted.
        self.listeners: list[Listener] = []
        for description in config.exim.listen:
            self.listeners.append(Listener(reactor, "exim", "[exim] listen", description,
                                           EximFactory(self.decider, config.exim, reactor)))
        for description in config.postfix.listen:
            self.listeners.append(Listener(
                reactor, "postfix", "[postfix] listen", description,
                PostfixFactory(self.decider, config.postfix, reactor)))
        self.control_factory = ControlFactory(self, reactor)
        control = str(config.daemon.control_socket)
        self.listeners.append(Listener(
            reactor, "control", "[daemon] control_socket", control, self.control_factory,
            endpoint=UNIXServerEndpoint(reactor, control,
                                        mode=config.daemon.control_socket_mode)))
        self._previous_sighup = None

    # --- lifecycle ---------------------------------------------------------------------

    # The store thread builds snapshots in Python; the reactor thread needs the GIL back
    # after every system call.  Python's default 5 ms switch interval would add up to
    # that per call to a query answered during a rebuild.
    SWITCH_INTERVAL = 0.0005

    def startService(self) -> None:
        sys.setswitchinterval(self.SWITCH_INTERVAL)
        self.started_at = self.reactor.seconds()
        started = []
        try:
            for listener in self.listeners:
                listener.startService()
                started.append(listener)
        except Exception as error:
            # Close what did bind; ``error.cleanup`` fires once the sockets are gone (the
            # reactor must run for that: Unix socket files are removed on the next turn).
            error.cleanup = defer.DeferredList([defer.maybeDeferred(l.stopService)
                                                for l in reversed(started)])
            raise
        self.store_thread.startService()
        self._hold_mta_listeners()
        self.snapshots.startService()
        super().startService()
        if self.install_signals:
            self._previous_sighup = signal.signal(
                signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.sighup))
        log.info(
            "policyd {version} started (pid {pid}): {listeners}; store {store}; "
            "refresh every {interval:g} s",
            version=__version__, pid=os.getpid(),
            listeners=", ".join(f"{l.kind} on {l.address}" for l in self.listeners),
            store=_safe_url(self.config.store.url), interval=self.config.store.refresh_interval,
            endpoints=[l.status() for l in self.listeners])

    # Bound to the sockets already (a failed bind aborted start-up above), but the MTA
    # listeners accept nothing until the first snapshot attempt has finished: connections
    # wait in the kernel's backlog for the ~100 ms of a first load instead of all getting
    # "no snapshot yet" 4xx (socket activation delivers the first client at once).  A store
    # that fails or is slow does not keep them waiting past FIRST_LOAD_WAIT.
    FIRST_LOAD_WAIT = 10.0

    def _hold_mta_listeners(self) -> None:
        held = [l.port for l in self.listeners
                if l.kind != "control" and hasattr(l.port, "stopReading")]
        if not held:
            return
        for port in held:
            port.stopReading()

        resumed = []

        def resume(_=None):
            if timer.active():
                timer.cancel()
            if resumed:
                return
            resumed.append(True)
            settle_heap()
            for port in held:
                if port.connected:
                    port.startReading()

        timer = self.reactor.callLater(self.FIRST_LOAD_WAIT, resume)
        self.snapshots.first_attempt().addCallback(resume)

    @defer.inlineCallbacks
    def stopService(self):
        if not self.running:
            return
        super().stopService()
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        log.info("policyd stopping: closing the listeners ({listeners})",
                      listeners=", ".join(f"{l.kind} on {l.address}" for l in self.listeners))
        yield defer.DeferredList([defer.maybeDeferred(l.stopService)
                                  for l in self.listeners])
        grace = self.config.daemon.shutdown_grace
        factories = [listener.factory for listener in self.listeners]
        in_flight = sum(len(f.connections) for f in factories)
        if in_flight:
            log.info("waiting up to {grace:g} s for {count} open connections",
                          grace=grace, count=in_flight)
        yield defer.DeferredList([f.drain(grace) for f in factories])
        yield defer.maybeDeferred(self.snapshots.stopService)
        self.store_thread.stopService()
        log.info("policyd stopped after {uptime:.1f} s; {total} answers",
                      uptime=self.reactor.seconds() - (self.started_at or 0),
                      total=self.decider.counters()["total"])

    def factory(self, kind: str):
        """The factory of the first listener of ``kind`` (for tests)."""
        return next(l.factory for l in self.listeners if l.kind == kind)

    def sighup(self) -> defer.Deferred:
        log.info("SIGHUP: reloading the data")
        if self.on_sighup is not None:
            try:
                self.on_sighup()
            except Exception:
                log.failure("SIGHUP hook failed")
        return self.snapshots.reload()

    # --- what the control socket asks ---------------------------------------------------

    def control_query(self, query: Query) -> dict:
        snapshot = self.snapshots.current
        if snapshot is None:
            reason = self.snapshots.unavailable_reason
            reply = self.config.smtp.error(reason)
            self.decider.count("control", "unavailable", reply.outcome.value)
            raise Unavailable(f"{reason}; the MTAs get {exim_reply_line(reply)!r}")
        p = self.config.postfix
        result = query_result(snapshot, query, self.config.smtp, postfix_mode=p.mode,
                              accept_action=p.accept_action, decide=chain_decide,
                              now=self.reactor.seconds(), loaded_at=self.snapshots.loaded_at)
        self.decider.count("control", result["decision"]["verdict"],
                           result["reply"]["outcome"])
        log.info("control query {recipient} sender=<{sender}>: {exim!r}",
                      recipient=query.recipient, sender=query.envelope_sender,
                      exim=result["exim"])
        return result

    def status(self) -> dict:
        now = self.reactor.seconds()
        out = {
            "version": __version__,
            "pid": os.getpid(),
            "config": self.config.source,
            "uptime": round(now - self.started_at, 3) if self.started_at is not None else 0.0,
            "listeners": [l.status() for l in self.listeners],
            "postfix": {"mode": self.config.postfix.mode,
                        "accept_action": self.config.postfix.accept_action},
            "counters": self.decider.counters(),
        }
        out.update(self.snapshots.status())
        return out

    @defer.inlineCallbacks
    def reload(self):
        ok = yield self.snapshots.reload()
        status = self.snapshots.status()
        return {"reloaded": bool(ok), "snapshot": status["snapshot"],
                "error": None if ok else self.snapshots.last_error}


def _safe_url(url: str) -> str:
    """The store URL without a password."""
    head, sep, tail = url.partition("://")
    if not sep or "@" not in tail:
        return url
    creds, at, rest = tail.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{head}://{user}:***@{rest}" if ":" in creds else url
