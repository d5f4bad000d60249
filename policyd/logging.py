"""Where the daemon's ``twisted.logger`` events go: stdout by default, a file if configured.

One line per event: ``<time> <level> [<namespace>] <text>``; a failure adds its traceback
on the following lines.  Under systemd (``JOURNAL_STREAM`` set and logging to stdout) the
time is left out and each line starts with the syslog priority (``<6>``), which journald
reads as the message level.  Events below ``[daemon] log_level`` are dropped before they
are formatted.

Writes are buffered and flushed once a second and at once for warnings and errors, so a
log line per decision stays cheap; ``reopen()`` (on SIGHUP) reopens the file after
log rotation.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Mapping

from twisted.logger import LogLevel, Logger, formatEvent, globalLogBeginner

_LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
           "error": LogLevel.error}
_PRIORITY = {LogLevel.debug: "<7>", LogLevel.info: "<6>", LogLevel.warn: "<4>",
             LogLevel.error: "<3>", LogLevel.critical: "<2>"}
_URGENT = (LogLevel.warn, LogLevel.error, LogLevel.critical)


class FastLogger(Logger):
    """A ``Logger`` for the line-per-decision path: the same events, without
    ``Logger.emit``'s per-call validation of the level (our levels are constants)."""

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        kwargs.update(log_logger=self, log_level=level, log_namespace=self.namespace,
                      log_source=self.source, log_format=format, log_time=time.time())
        self.observer(kwargs)


def _format(event: dict) -> str:
    """``formatEvent``, fast for plain ``{name}`` formats (one C-level ``format_map``);
    anything else (``{obj.method()}``, a missing field) goes through ``formatEvent``."""
    fmt = event.get("log_format")
    if fmt is not None:
        try:
            return fmt.format_map(event)
        except Exception:
            pass
    return formatEvent(event)


class LineWriter:
    """A log observer that formats events as lines and writes them to a stream."""

    def __init__(self, stream: IO[str], *, journal: bool = False) -> None:
        self.stream = stream
        self.journal = journal
        self._second = -1
        self._stamp = ""

    def _time(self, when: float) -> str:
        second = int(when)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(second))
        return f"{self._stamp}.{int((when - second) * 1000):03d}"

    def format(self, event: dict) -> str:
        level = event.get("log_level", LogLevel.info)
        text = _format(event)
        failure = event.get("log_failure")
        if failure is not None:
            try:
                text = f"{text}\n{failure.getTraceback().rstrip()}"
            except Exception:
                text = f"{text}\n(traceback unavailable)"
        namespace = event.get("log_namespace", "-")
        if self.journal:
            prefix = _PRIORITY.get(level, "<6>")
            lines = f"[{namespace}] {text}".split("\n")
            return "".join(f"{prefix}{line}\n" for line in lines)
        return f"{self._time(event.get('log_time') or time.time())} {level.name} " \
               f"[{namespace}] {text}\n"

    def __call__(self, event: dict) -> None:
        try:
            self.stream.write(self.format(event))
            if event.get("log_level") in _URGENT:
                self.stream.flush()
        except Exception:
            pass  # a log sink in trouble must never take the daemon down

    def flush(self) -> None:
        try:
            self.stream.flush()
        except Exception:
            pass

    def decision(self, protocol, verdict, list_, sender, senders, decided_by, rule, reply,
                 elapsed, request_id) -> None:
        """The line per decision, written directly: exactly the line the event
        (``service.log_decision_event``) would give, without building and publishing an
        event, which cost most of the line's 10 µs per query."""
        request = f" id={request_id}" if request_id else ""
        text = (f"{protocol} {verdict} list={list_} sender=<{sender}> senders={senders} "
                f"rule={rule} reply={reply!r} {elapsed:.3f}ms{request}")
        try:
            if self.journal:
                self.stream.write(f"<6>[policyd.decision] {text}\n")
            else:
                self.stream.write(f"{self._time(time.time())} info [policyd.decision] "
                                  f"{text}\n")
        except Exception:
            pass


class LogSetup:
    """What ``setup`` started: ``flush()`` periodically, ``reopen()`` on SIGHUP."""

    def __init__(self, writer: LineWriter, path: str | None) -> None:
        self.writer = writer
        self.path = path

    def flush(self) -> None:
        self.writer.flush()

    def reopen(self) -> None:
        if self.path is None:
            return
        old = self.writer.stream
        self.writer.stream = _open(self.path)
        try:
            old.close()
        except Exception:
            pass

    def close(self) -> None:
        self.writer.flush()


def _open(path: str) -> IO[str]:
    return open(path, "a", encoding="utf-8", errors="backslashreplace")


_ORDER = (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical)


class LevelFilter:
    """Drop events below the configured level before anything formats them (one set
    lookup: cheaper than ``FilteringLogObserver`` on a line-per-decision path).

    Twisted's own legacy info lines ("Factory starting on ...", "Port ... Closed") repeat
    what policyd's start-up and shutdown lines say: they are kept for ``debug`` only.
    """

    def __init__(self, observer, level: str) -> None:
        self.observer = observer
        threshold = _LEVELS[level]
        self.allowed = frozenset(_ORDER[_ORDER.index(threshold):])
        self.quiet_legacy = level != "debug"

    def __call__(self, event: dict) -> None:
        level = event.get("log_level")
        if level not in self.allowed:
            return
        if (self.quiet_legacy and level is LogLevel.info
                and event.get("log_namespace") == "log_legacy"):
            return
        self.observer(event)


def make_observer(level: str, stream: IO[str], *, journal: bool = False):
    writer = LineWriter(stream, journal=journal)
    return writer, LevelFilter(writer, level)


def setup(daemon_config, stream: IO[str] | None = None,
          environ: Mapping[str, str] | None = None) -> LogSetup:
    """Start the global log for the daemon (call once, before the reactor runs)."""
    environ = os.environ if environ is None else environ
    if daemon_config.log_file is not None:
        path = str(daemon_config.log_file)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        out = _open(path)
        journal = False
    else:
        path = None
        out = stream if stream is not None else sys.stdout
        if hasattr(out, "reconfigure"):
            out.reconfigure(errors="backslashreplace")
        journal = bool(environ.get("JOURNAL_STREAM"))
    writer, observer = make_observer(daemon_config.log_level, out, journal=journal)
    globalLogBeginner.beginLoggingTo([observer], discardBuffer=True,
                                     redirectStandardIO=False)
    return LogSetup(writer, path)
