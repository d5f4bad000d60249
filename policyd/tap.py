"""``twist policyd``: the command-line ``Options`` and ``makeService(options, reactor)``.

The configuration is loaded and validated while the options are parsed (a bad file stops
start-up with a usage error naming the file, the key and what is allowed), including every
listener endpoint string.  ``makeService`` builds the ``PolicyService`` without starting
it, so tests can pass a ``MemoryReactor`` and a fake store backend.
"""

from __future__ import annotations

import os
import sys

from twisted.application.internet import TimerService
from twisted.python import usage

from .config import Config, ConfigError, check_paths, default_path, load
from .listeners import raise_nofile_limit
from .service import PolicyService


def load_config(path) -> Config:
    """Load the file and check that every listener is a usable endpoint string (TCP
    ports in range, ``systemd:`` ones among the descriptors passed) and that every
    ``[smtp]`` reply template renders (``policyd.check``)."""
    from .check import endpoint_problems, template_problems

    config = load(path)
    problems, _ = endpoint_problems(config)
    problems += template_problems(config)
    if problems:
        raise ConfigError(f"{config.source}: " + f"; {config.source}: ".join(problems))
    return config


class Options(usage.Options):
    synopsis = "--config PATH"
    longdesc = ("Run policyd in the foreground: the Exim and Postfix policy listeners and "
                "the control socket, as configured in PATH.")
    optParameters = [
        ["config", "c", None,
         "configuration file (default: $POLICYD_CONFIG or /etc/policyd/policyd.conf)"],
    ]

    def __init__(self, environ=None) -> None:
        super().__init__()
        self.environ = os.environ if environ is None else environ
        self.loaded: Config | None = None

    def postOptions(self) -> None:
        if not self["config"]:
            self["config"] = default_path(self.environ)
        try:
            self.loaded = load_config(self["config"])
            check_paths(self.loaded)
        except ConfigError as error:
            raise usage.UsageError(str(error)) from None


def makeService(options, reactor=None, backend=None) -> PolicyService:
    """The daemon's service: the one construction path of ``policyd`` and ``twist
    policyd``.

    With ``reactor=None`` (both commands) the global reactor is used, SIGHUP is handled
    (reload the data, reopen the log file), the log is set up (``policyd`` owns the
    global log; under ``twist`` only a configured ``log_file`` gets policyd's writer, and
    twist's own observer gets policyd's rate limit and escaping in front of it) and
    ``[runtime]`` tuning is applied.  Tests pass their own reactor and backend and get
    none of that."""
    config = getattr(options, "loaded", None) or load_config(options["config"])
    managed = reactor is None
    if reactor is None:
        from twisted.internet import reactor
    logs = None
    launcher_limiter = None
    tuning = None
    if managed:
        from .logging import guard_launcher_log, setup
        from .runtime import monotonic
        from .runtime.tuning import Tuning

        # Timers on the monotonic clock, given before anything is scheduled:
        # ``policyd``'s reactor has it since ``install``, ``twist``'s gets it here.
        clock_note = monotonic.use(reactor)
        launcher = getattr(options, "launcher", "twist")
        # Files the daemon creates (its log, SQLite's journal) are not for other users.
        os.umask(0o027)
        logs = setup(config.daemon, sys.stdout, options.environ,
                     primary=launcher == "policyd")
        if launcher != "policyd":
            launcher_limiter = guard_launcher_log(getattr(options, "parent", None))
        raise_nofile_limit()
        notes = list(getattr(options, "runtime_notes", ()))
        if clock_note is not None:
            notes.append(f"timers on the wall clock (a clock step moves them): {clock_note}")
        if launcher != "policyd" and config.runtime.reactor and not _tuned_reactor(reactor):
            notes.append("reactor: twist runs its own reactor here; "
                         "`twist --reactor=policyd policyd` runs policyd's")
        tuning = Tuning(config.runtime, notes, clock=reactor)
    if backend is None:
        from .store import open_backend

        backend = open_backend(config.store)
    service = PolicyService(config, reactor, backend, install_signals=managed,
                            on_sighup=logs.reopen if logs is not None else None,
                            tuning=tuning,
                            environ=getattr(options, "environ", None) if managed else None)
    # dmarc-mitigation's DNS lookups (asked only for lists that reject or discard).
    from .dmarc_lookup import from_config
    service.decider.use_dmarc(from_config(config.dmarc, reactor))
    if logs is not None:
        service.logs = logs
        # The decision lines go straight to policyd's writer (the same line as the event).
        service.decision_log.writer = logs.writer
        flusher = TimerService(1.0, logs.flush)
        flusher.clock = reactor
        flusher.setServiceParent(service)
    if launcher_limiter is not None:
        ticker = TimerService(1.0, launcher_limiter.tick)
        ticker.clock = reactor
        ticker.setServiceParent(service)
    return service


def _tuned_reactor(reactor) -> bool:
    from .runtime.reactor import EPollReactor

    return isinstance(reactor, EPollReactor)
