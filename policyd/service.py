"""The running daemon: listeners, the snapshot service, start-up and shutdown.

``PolicyService`` composes the store thread, the ``SnapshotService``, one ``Listener``
per configured endpoint string and the control socket, and owns the order of start-up
(a failed bind aborts it, naming the configuration key) and shutdown (close the
listeners, let connections in flight finish within ``daemon.shutdown_grace``, stop the
refresh, close the store).
"""

from __future__ import annotations

import os
import signal
from typing import Callable

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.logger import Logger

from . import __version__
from .config import Config
from .core.verdict import Query
from .decider import Decider
from .listeners import Listener
from .logging import DecisionLog
from .protocols.control import RELOAD_WAIT, ControlFactory, query_result
from .protocols.exim import EximFactory
from .protocols.postfix import PostfixFactory
from .snapshot_service import SnapshotService, StoreThread
from .store.engine import safe_url

log = Logger(namespace="policyd")


class ListenerGroup(MultiService):
    """The listeners, bound in order; a failed bind aborts start-up (what did bind is
    closed: ``error.cleanup`` fires once the sockets are gone, which needs the reactor to
    run), and stopping closes them all, then lets the open connections finish within
    ``grace`` seconds.

    Bound at once, but the MTA listeners accept nothing until ``ready`` fires (the first
    snapshot attempt): connections wait in the kernel's backlog for the ~100 ms of a first
    load instead of all getting "no snapshot yet" 4xx (socket activation delivers the
    first client at once).  A store that fails or is slow does not keep them waiting past
    ``first_load_wait`` seconds.
    """

    def __init__(self, reactor, listeners, *, grace: float, ready, first_load_wait: float,
                 on_ready=None, on_serving=None) -> None:
        super().__init__()
        self.reactor = reactor
        self.grace = grace
        self.ready = ready
        self.first_load_wait = first_load_wait
        self.on_ready = on_ready
        # Called once the MTA listeners accept (systemd's READY=1).
        self.on_serving = on_serving
        for listener in listeners:
            listener.setServiceParent(self)

    def startService(self) -> None:
        started = []
        try:
            for listener in self:
                listener.startService()
                started.append(listener)
        except Exception as error:
            error.cleanup = defer.DeferredList([defer.maybeDeferred(l.stopService)
                                                for l in reversed(started)])
            raise
        Service.startService(self)
        self._hold_mta_listeners()

    def _hold_mta_listeners(self) -> None:
        held = [l.port for l in self if l.kind not in ("control", "metrics")
                and hasattr(l.port, "stopReading")]
        for port in held:
            port.stopReading()
        resumed = []

        def resume(_=None):
            if timer.active():
                timer.cancel()
            if resumed:
                return
            resumed.append(True)
            if self.on_ready is not None:
                self.on_ready()
            for port in held:
                if port.connected:
                    port.startReading()
            if self.on_serving is not None:
                try:
                    self.on_serving()
                except Exception:
                    log.failure("the start-up notification failed")

        timer = self.reactor.callLater(self.first_load_wait, resume)
        self.ready().addCallback(resume)

    @defer.inlineCallbacks
    def stopService(self):
        Service.stopService(self)
        listeners = list(self)
        log.info("policyd stopping: closing the listeners ({listeners})",
                 listeners=", ".join(f"{l.kind} on {l.address}" for l in listeners))
        yield defer.DeferredList([defer.maybeDeferred(l.stopService) for l in listeners])
        factories = [listener.factory for listener in listeners]
        in_flight = sum(len(f.connections) for f in factories)
        if in_flight:
            log.info("waiting up to {grace:g} s for {count} open connections",
                     grace=self.grace, count=in_flight)
        yield defer.DeferredList([f.drain(self.grace) for f in factories])


class PolicyService(MultiService):
    """The whole daemon as one Twisted service (what ``tap.makeService`` returns): the
    listeners, the store thread and the snapshot service, started in that order (a failed
    bind aborts start-up before the store is touched) and stopped in the reverse order
    (listeners closed and connections drained first)."""

    # Seconds the MTA listeners wait for the first snapshot attempt (``ListenerGroup``).
    FIRST_LOAD_WAIT = 10.0

    def __init__(self, config: Config, reactor, backend, *, store_thread=None,
                 install_signals: bool = False, on_sighup: Callable[[], None] | None = None,
                 tuning=None, environ=None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.backend = backend
        self.install_signals = install_signals
        self.on_sighup = on_sighup
        # A SIGHUP waits for its reload (to tell systemd): later ones meanwhile join it.
        self._sighup_waiting = False
        # ``policyd.runtime.tuning.Tuning`` when the daemon applies runtime tuning.
        self.tuning = tuning
        self.store_thread = store_thread if store_thread is not None else StoreThread(reactor)
        if tuning is not None:
            self.store_thread.niceness = config.runtime.store_niceness
        self.snapshots = SnapshotService(
            backend, interval=config.store.refresh_interval, clock=reactor,
            run_in_thread=self.store_thread.run,
            refresh_timeout=config.store.refresh_timeout,
            max_stale=config.store.max_stale)
        # Instant propagation where the store notifies (PostgreSQL): a thread LISTENs and
        # wakes the snapshot service (``policyd.change_listener``).
        self.change_listener = None
        notify_channel = getattr(backend, "notify_channel", None)
        channel = notify_channel() if notify_channel and config.store.listen_notify else None
        if channel:
            from .change_listener import ChangeListener

            self.change_listener = ChangeListener(
                reactor, backend.listen, lambda: self.snapshots.changed(), channel=channel,
                store=safe_url(config.store.url))
            self.snapshots.change_listener = self.change_listener
        elif config.store.watch_interval > 0 and getattr(backend, "watch_path", None):
            # SQLite cannot notify; a thread watches its files instead
            # (``policyd.sqlite_watch``).
            path = backend.watch_path()
            if path is not None:
                from .sqlite_watch import SqliteWatcher

                self.change_listener = SqliteWatcher(
                    reactor, path, lambda: self.snapshots.changed(),
                    interval=config.store.watch_interval, store=safe_url(config.store.url))
                self.snapshots.change_listener = self.change_listener
        self.decider = Decider(self.snapshots, config.smtp,
                               fail_closed=config.daemon.fail_closed,
                               null_sender=config.rules.null_sender,
                               roles=config.rules.role_addresses,
                               per_list=config.metrics.per_list,
                               latency=bool(config.metrics.listen),
                               run_in_thread=self._password_thread(reactor),
                               clock=reactor)
        # systemd notifications (``$NOTIFY_SOCKET``): only with the environment passed
        # in (the daemon's own, from ``tap.makeService``); a no-op without the variable.
        from .systemd import SystemdNotifier

        self.notifier = SystemdNotifier(reactor, environ or {}, self.notify_status)
        self._rate_mark: tuple[float, int] | None = None
        self.decision_log = DecisionLog(
            enabled=config.daemon.log_level in ("debug", "info"))
        self.started_at: float | None = None
        # One factory per listener, so each listener's open connections can be counted.
        listeners: list[Listener] = []
        for description in config.exim.listen:
            listeners.append(Listener(reactor, "exim", "[exim] listen", description,
                                      EximFactory(self.decider, config.exim, reactor,
                                                  self.decision_log)))
        for description in config.postfix.listen:
            listeners.append(Listener(
                reactor, "postfix", "[postfix] listen", description,
                PostfixFactory(self.decider, config.postfix, reactor, self.decision_log)))
        # SMTP-time moderation (issue 17): its state lives in the native store's
        # database; a list uses it only with ``smtp_moderation`` set.
        self.moderation = None
        engine = getattr(backend, "moderation_engine", None)
        if engine is not None:
            from .core.moderation import Settings
            from .moderation_service import ModerationService

            m = config.moderation
            self.moderation = ModerationService(
                self.snapshots, engine, run_in_thread=self.store_thread.run, clock=reactor,
                interval=m.sync_interval,
                settings=Settings(m.min_delay, m.max_age, m.remember, m.decide_within,
                                  m.max_entries, m.max_tickets))
            self.moderation.setServiceParent(self)
            for listener in listeners:
                listener.factory.moderation = self.moderation
        self.control_factory = ControlFactory(
            self, reactor, reload_wait=self.snapshots.refresh_timeout or RELOAD_WAIT)
        control = str(config.daemon.control_socket)
        listeners.append(Listener(
            reactor, "control", "[daemon] control_socket", control, self.control_factory,
            endpoint=UNIXServerEndpoint(reactor, control,
                                        mode=config.daemon.control_socket_mode),
            path=control))
        if tuning is not None:
            for listener in listeners:
                tuning.apply_to_factory(listener.factory)
        if config.metrics.listen:
            from .metrics import metrics_site

            listeners.append(Listener(reactor, "metrics", "[metrics] listen",
                                      config.metrics.listen, metrics_site(self)))
        self.listener_group = ListenerGroup(
            reactor, listeners, grace=config.daemon.shutdown_grace,
            ready=self.snapshots.first_attempt,
            first_load_wait=self.FIRST_LOAD_WAIT,
            on_ready=tuning.first_load_done if tuning is not None else None,
            on_serving=self.notifier.ready)
        self.listener_group.setServiceParent(self)
        self._previous_sighup = None

    _passwords_pool = None

    def _password_thread(self, reactor):
        """Where moderator passwords are verified: a small thread pool of the daemon's
        own (started and stopped with it), never the reactor thread.  ``None`` for a
        reactor without threads (tests): then they are verified inline."""
        if not hasattr(reactor, "callFromThread") or not hasattr(reactor, "callWhenRunning"):
            return None
        from twisted.internet.threads import deferToThreadPool
        from twisted.python.threadpool import ThreadPool

        self._passwords_pool = pool = ThreadPool(minthreads=0, maxthreads=2,
                                                 name="policyd-passwords")
        return lambda f, *args: deferToThreadPool(reactor, pool, f, *args)

    @property
    def listeners(self) -> list[Listener]:
        return list(self.listener_group)

    # --- lifecycle ---------------------------------------------------------------------

    def startService(self) -> None:
        self.started_at = self.reactor.seconds()
        if self.tuning is not None:
            self.tuning.daemon_starting()
        self.listener_group.first_load_wait = self.FIRST_LOAD_WAIT
        self.listener_group.startService()
        # The store thread and the snapshot service are attributes a test may swap before
        # start: started from here, not as children, so the swapped ones are the ones run.
        self.store_thread.startService()
        if self._passwords_pool is not None:
            self._passwords_pool.start()
        self.snapshots.startService()
        if self.change_listener is not None:
            self.change_listener.startService()
        self.notifier.startService()
        for child in self:
            if child is not self.listener_group:
                child.startService()
        Service.startService(self)
        if self.install_signals:
            self._previous_sighup = signal.signal(
                signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.sighup))
        log.info(
            "policyd {version} started (pid {pid}): {listeners}; store {store}; "
            "refresh every {interval:g} s",
            version=__version__, pid=os.getpid(),
            listeners=", ".join(f"{l.kind} on {l.address}" for l in self.listeners),
            store=safe_url(self.config.store.url), interval=self.config.store.refresh_interval,
            endpoints=[l.status() for l in self.listeners])

    @defer.inlineCallbacks
    def stopService(self):
        if not self.running:
            return
        Service.stopService(self)
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        self.notifier.stopService()
        yield self.listener_group.stopService()
        yield defer.DeferredList([defer.maybeDeferred(child.stopService) for child in self
                                  if child is not self.listener_group and child.running])
        if self.change_listener is not None and self.change_listener.running:
            self.change_listener.stopService()
        yield defer.maybeDeferred(self.snapshots.stopService)
        self.store_thread.stopService()
        if self._passwords_pool is not None:
            self._passwords_pool.stop()
        if self.tuning is not None:
            self.tuning.daemon_stopped()
        log.info("policyd stopped after {uptime:.1f} s; {total} answers",
                 uptime=self.reactor.seconds() - (self.started_at or 0),
                 total=self.decider.counters()["total"])

    def notify_status(self) -> str:
        """systemd's ``STATUS=``: the snapshot served, the store's health, the answers
        per second since the last status."""
        now = self.reactor.seconds()
        total = sum(sum(c.values()) for c in self.decider.by_protocol.values())
        previous, self._rate_mark = self._rate_mark, (now, total)
        if previous is None or now <= previous[0]:
            rate = ""
        else:
            rate = f"; {(total - previous[1]) / (now - previous[0]):.1f} answers/s"
        snapshot = self.snapshots.current
        if snapshot is None:
            serving = "no snapshot yet (answering 4xx)"
        else:
            serving = (f"serving snapshot {snapshot.version} ({len(snapshot.lists)} lists)")
        unhealthy = self.snapshots.unhealthy_reason()
        store = "" if unhealthy is None or snapshot is None else f"; store: {unhealthy}"
        return f"{serving}{store}{rate}; {total} answers"

    def factory(self, kind: str):
        """The factory of the first listener of ``kind`` (for tests)."""
        return next(l.factory for l in self.listeners if l.kind == kind)

    def sighup(self) -> defer.Deferred | None:
        log.info("SIGHUP: reloading the data")
        if self.on_sighup is not None:
            try:
                self.on_sighup()
            except Exception:
                log.failure("SIGHUP hook failed")
        if self._sighup_waiting:
            # One SIGHUP already waits for the reload: this one joins it, nothing kept.
            self.snapshots.reload(wait=False)
            return None
        self._sighup_waiting = True
        d = self.snapshots.reload()

        def tell_systemd(result):
            self._sighup_waiting = False
            if self.notifier.is_ready:
                self.notifier.update_status()
            return result
        return d.addBoth(tell_systemd)

    # --- what the control socket asks ---------------------------------------------------

    def control_query(self, query: Query, client: str | None = None, *,
                      message_id: str | None = None) -> dict | defer.Deferred:
        """``policyctl query``'s result; a ``Deferred`` when a moderator password must be
        verified first (in a thread, never on the reactor).  ``client``: the SMTP
        client's address, for SMTP-time moderation's network; ``message_id``: the post's
        Message-ID: header, for the Exim preview's key.  Read-only: moderation is
        previewed, never applied."""
        pending = self.decider.decide(query, "control", counted=False).pending
        if pending is not None:
            waiting = self.decider.verify([pending])
            if waiting is not None:
                return waiting.addCallback(
                    lambda _: self._control_query(query, client, message_id))
        return self._control_query(query, client, message_id)

    def _control_query(self, query: Query, client: str | None = None,
                       message_id: str | None = None) -> dict:
        p = self.config.postfix
        result = query_result(self.decider, query, postfix_mode=p.mode,
                              accept_action=p.accept_action,
                              now=self.snapshots.monotonic(),
                              loaded_at=self.snapshots.loaded_at,
                              moderation=self.moderation, client=client,
                              message_id=message_id)
        self.decider.count_answer("control", result["reply"]["outcome"])
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
        if self.moderation is not None:
            out["moderation"] = self.moderation.status()
        else:
            from .moderation_service import NOT_IN_USE

            out["moderation"] = dict(NOT_IN_USE)
        return out

    @defer.inlineCallbacks
    def reload(self):
        """``policyctl reload``'s answer.  Cancelled (the control socket gives up
        waiting: ``ControlFactory.reload_wait``, or its connection is needed for
        another), it answers that the reload is still running, and why; the reload
        itself still runs."""
        snapshots = self.snapshots
        try:
            ok = yield snapshots.reload()
        except defer.CancelledError:
            ok = None
        status = snapshots.status()
        if ok is None:
            error = f"reload still running: {snapshots.reload_delay()}"
        else:
            error = None if ok else snapshots.last_error
        return {"reloaded": bool(ok), "snapshot": status["snapshot"], "error": error,
                **({"running": True} if ok is None else {})}
