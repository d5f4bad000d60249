"""Where the daemon's ``twisted.logger`` events go: stdout by default, a file if configured.

One line per event: ``<time> <level> [<namespace>] <text>``; a failure adds its traceback
on the following lines.  Under systemd (``JOURNAL_STREAM`` set and logging to stdout) the
time is left out and each line starts with the syslog priority (``<6>``), which journald
reads as the message level.  Events below ``[daemon] log_level`` are dropped before they
are formatted.

Writes are buffered and flushed once a second and at once for warnings and errors, so a
log line per decision stays cheap, and a thread of their own writes them to a file or to
standard output (``policyd.logfile``: the reactor never waits for a disk, and a backlog
is bounded); ``reopen()`` (on SIGHUP) reopens the file after log rotation.  A log file
policyd creates is mode 0640 whatever the umask.

A failure's traceback is bounded (``bounded_traceback``): a frame repeated in a row is
written three times and then counted, as Python's own tracebacks do, and beyond
``MAX_FRAMES`` frames only the outermost and innermost are written, so one failure (a
recursion a thousand frames deep) never writes thousands of lines.

Every line is one line: control characters in any value (``\n``, ``\r``, NUL, ESC, the
C1 controls, U+2028/2029) are written escaped (``\n``, ``\x00``), so a peer cannot
forge a line or a terminal sequence (``escape_controls``).

Events an outsider can trigger by the thousand (a malformed or over-long request,
Twisted's accept errors at the descriptor limit, an event with ``rate_limit=<kind>``)
pass ``RateLimit``: the first few per kind and interval are written, the rest counted
and summed up in one line per interval.  A decision line cuts each value a client chose
at ``FIELD_MAX`` characters (``capped``).

Under ``twist``, whose own observer writes the log, ``guard_launcher_log`` puts the
``RateLimit`` and the escaping (``Escaped``, which also hands twist's text observer the
bounded traceback) in front of that observer: the same promises hold whichever command
started the daemon.
"""

from __future__ import annotations

import linecache
import os
import re
import sys
import time
from time import perf_counter
from typing import IO, Mapping

from twisted.logger import LogLevel, Logger, formatEvent, globalLogBeginner, globalLogPublisher
from twisted.python.reflect import qual, safe_str

from .logfile import LogStream

_LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
           "error": LogLevel.error}
_PRIORITY = {LogLevel.debug: "<7>", LogLevel.info: "<6>", LogLevel.warn: "<4>",
             LogLevel.error: "<3>", LogLevel.critical: "<2>"}
_URGENT = (LogLevel.warn, LogLevel.error, LogLevel.critical)


_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: re.Match) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` with every control character escaped: one line, no terminal sequence;
    and no invisible format character either (a right-to-left override or a zero-width
    space in a sender's address would make the line read otherwise than it is written).
    Lone surrogates (undecodable bytes of a peer, ``surrogateescape``) are left to the
    stream's error handler, which writes them as ``\\x..``."""
    if _CONTROLS.search(text) is not None:
        text = _CONTROLS.sub(_escape_one, text)
    if _INVISIBLE.search(text) is not None:
        text = _INVISIBLE.sub(_escape_one, text)
    return text


# Format characters (Unicode category Cf: bidirectional overrides and isolates, zero-width
# characters, the byte order mark...) and separators other than the ASCII space (Zs, Zl,
# Zp), as Python 3.11's unicodedata has them, written out: deriving the class at import
# costs a third of a second.  tests/protocols/test_hardening.py checks it against the
# running Python's unicodedata.
_INVISIBLE = re.compile(
    "[\u00a0\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u1680\u180e"
    "\u2000-\u200f\u2028-\u202f\u205f-\u2064\u2066-\u206f\u3000\ufeff\ufff9-\ufffb"
    "\U000110bd\U000110cd\U00013430-\U00013438\U0001bca0-\U0001bca3"
    "\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f]")

# What could end a field of the decision line early, or make it read as two: the
# sender, the list and the header senders are any SMTP client's words.  (Other white
# space is a control character or an invisible one: ``escape_controls`` writes it as
# ``\t``, ``\xa0``..., no space left.)
_FORGEABLE = re.compile(r'[ <>"\\]')


def _forgeable(text: str) -> bool:
    # Five C-level scans: a quarter of the regular expression's cost, on every line.
    return " " in text or ">" in text or "<" in text or '"' in text or "\\" in text


def _hex_one(match: re.Match) -> str:
    char = match.group()
    if char == "\\":
        return "\\\\"
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


# A value longer than this is cut where the decision line writes it (``capped``): a
# client's sender or a Postfix attribute can be tens of kilobytes, and one request can
# name many lists, each its own line.
FIELD_MAX = 256


def capped(value: str) -> str:
    """``value``, or its first ``FIELD_MAX`` characters and ``...(+N)``, N the characters
    left out (no space: a field of the decision line is one word)."""
    if len(value) <= FIELD_MAX:
        return value
    return f"{value[:FIELD_MAX]}...(+{len(value) - FIELD_MAX})"


def field_text(value: str) -> str:
    """A decision line's ``sender``, ``list`` or ``senders`` value as it is written:
    a space, ``<``, ``>`` and ``"`` escaped as ``\\xNN``, a backslash doubled, so that
    a value cannot end its field or forge the next one."""
    if _FORGEABLE.search(value) is None:
        return value
    return _FORGEABLE.sub(_hex_one, value)


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


# A traceback shows at most this many frames: the outermost ``_HEAD`` and the innermost
# rest (where it was raised); its exception text at most ``_MAX_MESSAGE`` characters.
MAX_FRAMES = 30
_HEAD = 8
_REPEATS = 3  # a frame repeated in a row: written this many times, then counted
_MAX_MESSAGE = 2000


def bounded_traceback(failure) -> str:
    """``failure``'s traceback as Twisted writes it (``Failure.getTraceback``), bounded:
    a frame repeated in a row is written ``_REPEATS`` times and then counted
    (``[Previous line repeated N more times]``, as Python's own tracebacks say), at most
    ``MAX_FRAMES`` frames are written (the first ``_HEAD`` and the last ones, with a line
    saying how many were left out), and the exception's text is cut at ``_MAX_MESSAGE``
    characters with its control characters escaped."""
    entries: list[str] = []
    last, repeated = None, 0
    for frame in failure.frames:
        name, filename, lineno = frame[0], frame[1], frame[2]
        if (name, filename, lineno) == last:
            repeated += 1
            if repeated >= _REPEATS:
                continue
        else:
            if repeated >= _REPEATS:
                entries.append(f"  [Previous line repeated {repeated - _REPEATS + 1} more "
                               f"times]")
            last, repeated = (name, filename, lineno), 0
        code = linecache.getline(filename, lineno).strip()
        entries.append(f'  File "{filename}", line {lineno}, in {name}'
                       + (f"\n    {code}" if code else ""))
    if repeated >= _REPEATS:
        entries.append(f"  [Previous line repeated {repeated - _REPEATS + 1} more times]")
    if len(entries) > MAX_FRAMES:
        tail = MAX_FRAMES - _HEAD
        entries = entries[:_HEAD] + [
            f"  [{len(entries) - MAX_FRAMES} more frames left out]"] + entries[-tail:]
    message = safe_str(failure.value)
    if len(message) > _MAX_MESSAGE:
        message = message[:_MAX_MESSAGE] + f"... ({len(message) - _MAX_MESSAGE} more characters)"
    head = "Traceback (most recent call last):" if entries else \
        "Traceback (failure with no frames):"
    return "\n".join([head, *entries,
                      f"{qual(failure.type)}: {escape_controls(message)}"])


# ".000" to ".999": the milliseconds of a log line's time by index, not by formatting.
_MILLIS = tuple(f".{ms:03d}" for ms in range(1000))


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
        return self._stamp + _MILLIS[int((when - second) * 1000)]

    def format(self, event: dict) -> str:
        level = event.get("log_level", LogLevel.info)
        text = escape_controls(_format(event))
        failure = event.get("log_failure")
        if failure is not None:
            try:
                text = f"{text}\n{bounded_traceback(failure)}"
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
                 elapsed, request_id, extra: str = "") -> None:
        """The line per decision, written directly: exactly the line the event
        (``DecisionLog`` without a writer) would give, without building and publishing an
        event, which cost most of the line's 10 µs per query.  ``extra``: ``log_fields``
        text appended at the end (the Postfix client and queue id)."""
        # DECISION_FORMAT, spelled as an f-string: a third of the cost of str.format.
        text = (f"{protocol} {verdict} list={list_} sender=<{sender}> senders={senders} "
                f"rule={rule} reply={reply!r} {elapsed:.3f}ms"
                f"{f' id={request_id}' if request_id else ''}{extra}")
        if not (text.isascii() and text.isprintable()):  # C-level checks: nearly always
            text = escape_controls(text)
        try:
            if self.journal:
                self.stream.write(f"<6>[policyd.decision] {text}\n")
            else:
                when = time.time()
                second = int(when)
                if second != self._second:
                    self._time(when)
                self.stream.write(f"{self._stamp}{_MILLIS[int((when - second) * 1000)]} "
                                  f"info [policyd.decision] {text}\n")
        except Exception:
            pass


DECISION_FORMAT = ("{protocol} {verdict} list={list} sender=<{sender}> senders={senders} "
                   "rule={rule} reply={reply!r} {elapsed:.3f}ms{request}")
TROUBLE_FORMAT = ("{protocol} {verdict} list={list} sender=<{sender}> reason={reason!r} "
                  "reply={reply!r} {elapsed:.3f}ms{request}")

_PLAIN_VALUE = re.compile(r"[A-Za-z0-9._:@+/\[\]-]+\Z")


def log_fields(pairs) -> str:
    """`` name=value`` for each pair whose value is not empty or ``None``, appended to a
    decision line, each value cut at ``FIELD_MAX`` characters (``capped``): a value with
    anything but letters, digits and ``._:@+/[]-`` is quoted with ``\\`` and ``\"``
    escaped, so a peer's value (a SASL user name, a client name) cannot forge another
    field; control characters are escaped with the whole line."""
    out = []
    for name, value in pairs:
        if not value:
            continue
        value = capped(value)
        if _PLAIN_VALUE.match(value) is None:
            value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        out.append(f" {name}={value}")
    return "".join(out)


class DecisionLog:
    """The one line per answer, for every protocol.

    A ``twisted.logger`` event in namespace ``policyd.decision`` by default; the daemon
    hands in its ``LineWriter`` (``writer``), which writes the same line directly.  A
    trouble line (no decision: no snapshot, an error, an unmanaged domain) is always an
    event, a warning for an error.
    """

    def __init__(self, enabled: bool = True, writer: "LineWriter | None" = None) -> None:
        self.enabled = enabled
        self.writer = writer
        self.log = Logger(namespace="policyd.decision")

    def decision(self, protocol, verdict, list_, sender, senders, decided_by, rule, reply,
                 elapsed, request_id, extra: str = "") -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.decision(protocol, verdict, list_, sender, senders, decided_by, rule,
                                 reply, elapsed, request_id, extra)
            return
        self.log.info(DECISION_FORMAT, protocol=protocol, verdict=verdict, list=list_,
                      sender=sender, senders=senders, decided_by=decided_by, rule=rule,
                      reply=reply, elapsed=elapsed,
                      request=(f" id={request_id}" if request_id else "") + extra,
                      request_id=request_id)

    def answered(self, protocol: str, query, answer, wire: str, request_id,
                 extra: str = "") -> None:
        """The line for one ``Answer`` of the ``Decider``, as ``wire`` was sent: the one
        call each protocol makes per decision.  ``extra``: ``log_fields`` text for the
        end of the line.  The client's values (list, sender, senders, request id) are
        cut at ``FIELD_MAX`` characters each (``capped``); ``wire`` is bounded where the
        reply is made (``replies.MAX_TEXT``)."""
        if not self.enabled:
            return
        decision = answer.decision
        elapsed = (perf_counter() - answer.started) * 1000.0
        sender = query.envelope_sender
        if request_id and len(request_id) > FIELD_MAX:
            request_id = capped(request_id)
        if decision is None:
            list_ = query.recipient
            fields = list_ + sender
            if len(fields) > FIELD_MAX:
                list_, sender = capped(list_), capped(sender)
                fields = list_ + sender
            if _forgeable(fields):
                list_, sender = field_text(list_), field_text(sender)
            self.trouble(protocol, answer.trouble, list_, sender, answer.reason, wire,
                         elapsed, request_id, extra)
        else:
            list_ = decision.list or query.recipient
            senders = ",".join(decision.senders) or "-"
            fields = list_ + sender + senders
            if len(fields) > FIELD_MAX:
                list_, sender, senders = capped(list_), capped(sender), capped(senders)
                fields = list_ + sender + senders
            if _forgeable(fields):
                list_, sender, senders = field_text(list_), field_text(sender), \
                    field_text(senders)
            (self.decision if self.writer is None else self.writer.decision)(
                protocol, decision.verdict._value_, list_, sender, senders,
                decision.sender, decision.rule, wire, elapsed, request_id, extra)

    def trouble(self, protocol, label, list_, sender, reason, reply, elapsed,
                request_id, extra: str = "") -> None:
        if not self.enabled:
            return
        # Info, an error too: the decision's failure is a warning once per incident
        # (``Decider``); a line per request at warn would flood a warn-level log with
        # what any sender can repeat (a header too deep for the parser).
        self.log.info(
            TROUBLE_FORMAT, protocol=protocol, verdict=label, list=list_, sender=sender,
            reason=capped(reason), reply=reply, elapsed=elapsed,
            request=(f" id={request_id}" if request_id else "") + extra,
            request_id=request_id)


class LogSetup:
    """What ``setup`` started: ``flush()`` periodically, ``reopen()`` on SIGHUP."""

    def __init__(self, writer: LineWriter, path: str | None, limiter=None) -> None:
        self.writer = writer
        self.path = path
        self.limiter = limiter
        self.log = Logger(namespace="policyd.log")

    def flush(self) -> None:
        if self.limiter is not None:
            self.limiter.tick()
        self.writer.flush()
        take = getattr(self.writer.stream, "take_left_out", None)
        left_out = take() if take is not None else None
        if left_out is None:
            return
        count, error = left_out
        if not count:  # nothing lost: a reopen that failed (SIGHUP, log rotation)
            self.log.warn("{error}: still writing to the log file opened before "
                          "({path}); fix it and send SIGHUP again", error=error,
                          path=self.path)
            return
        self.log.warn("left out {count} log lines: the log took them slower than they "
                      "came{error}", count=count,
                      error=f" ({error})" if error else " (a slow or busy disk?)")

    def reopen(self) -> None:
        if self.path is None:
            return
        stream = self.writer.stream
        if isinstance(stream, LogStream):
            stream.reopen()  # in order with the lines before it, on the writer thread
            return
        self.writer.stream = _open(self.path)
        try:
            stream.close()
        except Exception:
            pass

    def close(self) -> None:
        self.writer.flush()
        stream = self.writer.stream
        if isinstance(stream, LogStream):
            stream.close()


LOG_FILE_MODE = 0o640


def _open_fd(path: str) -> int:
    """Append to ``path``; a file it creates is mode 0640 whatever the umask (a stricter
    umask would otherwise lock out the group the logs are read by); an existing file's
    mode is left as it is."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, LOG_FILE_MODE)
    except FileExistsError:
        fd = os.open(path, flags | os.O_CREAT, LOG_FILE_MODE)
    else:
        os.fchmod(fd, LOG_FILE_MODE)
    return fd


def _open(path: str) -> LogStream:
    """The log file at ``path`` (``_open_fd``), written by its own thread (``LogStream``)."""
    return LogStream(_open_fd(path), opener=lambda: _open_fd(path))


def _stdout_stream(out):
    """Standard output written by a thread of its own (``LogStream``) when it is a real
    descriptor; anything else (a test's ``StringIO``) as it is."""
    try:
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):
        if hasattr(out, "reconfigure"):
            out.reconfigure(errors="backslashreplace")
        return out
    out.flush()  # what was printed before goes first
    return LogStream(fd)


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


_TWISTED_ACCEPT = ("EMFILE encountered", "EMFILE recovery", "Re-reserving EMFILE",
                   "Could not accept new connection")


def outsider_kind(event: dict) -> str | None:
    """The kind of an event an outsider can trigger at will, else ``None``: an event's
    own ``rate_limit`` field, a malformed request, Twisted's accept errors."""
    kind = event.get("rate_limit")
    if kind is not None:
        return kind
    fmt = event.get("log_format")
    if not fmt:
        return None
    namespace = event.get("log_namespace") or ""
    if namespace.startswith("twisted.internet") and fmt.startswith(_TWISTED_ACCEPT):
        return "accept errors (descriptor limit)"
    if namespace in ("policyd.exim", "policyd.postfix") and fmt.startswith("malformed"):
        return f"malformed {namespace[8:].capitalize()} requests"
    return None


class RateLimit:
    """Per kind of outsider-triggered event (``outsider_kind``): the first ``burst`` in
    each ``interval`` seconds are written, the rest only counted; when the interval is
    over (at the next event or ``tick()``, which ``LogSetup.flush`` calls every second)
    one warning sums up what was left out, with the count per kind."""

    def __init__(self, observer, *, interval: float = 60.0, burst: int = 5,
                 clock=time.monotonic) -> None:
        self.observer = observer
        self.interval = interval
        self.burst = burst
        self.clock = clock
        self.window_end: float | None = None
        self.seen: dict[str, int] = {}

    def __call__(self, event: dict) -> None:
        kind = outsider_kind(event)
        if self.window_end is not None and self.clock() >= self.window_end:
            self.tick()
        if kind is None:
            self.observer(event)
            return
        if self.window_end is None:
            self.window_end = self.clock() + self.interval
        count = self.seen.get(kind, 0) + 1
        self.seen[kind] = count
        if count <= self.burst:
            self.observer(event)

    def tick(self) -> None:
        """Close the interval if it is over: one summary line if anything was left out."""
        if self.window_end is None or self.clock() < self.window_end:
            return
        left_out = {kind: count - self.burst for kind, count in self.seen.items()
                    if count > self.burst}
        self.window_end = None
        self.seen = {}
        if left_out:
            self.observer({
                "log_level": LogLevel.warn, "log_namespace": "policyd.log",
                "log_time": time.time(), "log_format": "{summary}",
                "summary": f"left out {sum(left_out.values())} similar lines in the last "
                           f"{self.interval:g} s: " + ", ".join(
                               f"{kind}: {count}" for kind, count in sorted(left_out.items())),
            })


def make_observer(level: str, stream: IO[str], *, journal: bool = False,
                  rate_interval: float = 60.0):
    """The writer, and the observer to publish to: level filter, then rate limit
    (``observer.observer``, ticked by ``LogSetup.flush``)."""
    writer = LineWriter(stream, journal=journal)
    observer = LevelFilter(RateLimit(writer, interval=rate_interval), level)
    return writer, observer


class Escaped:
    """An observer in front of one that formats events its own way (twist's text or
    JSON observer): an event whose text holds a control or invisible character
    (``escape_controls``) is handed on as a copy whose format is that text escaped, so
    what the observer writes is the line ``LineWriter`` would write.  The fields stay as
    they were, for an observer that writes them (JSON escapes them itself)."""

    def __init__(self, observer, *, tracebacks: bool = False) -> None:
        self.observer = observer
        self.tracebacks = tracebacks

    def __call__(self, event: dict) -> None:
        text = _format(event)
        if not (text.isascii() and text.isprintable()):  # C-level checks: nearly always
            escaped = escape_controls(text)
            if escaped != text:
                event = dict(event, log_format=escaped.replace("{", "{{").replace("}", "}}"))
        if self.tracebacks and event.get("log_failure") is not None:
            event = dict(event, log_failure=_BoundedFailure(event["log_failure"]))
        self.observer(event)


class _BoundedFailure:
    """A failure as a text observer reads it (``getTraceback``, all twist's text observer
    asks of one): ``bounded_traceback``, whose exception text, which a peer may have
    chosen, is escaped and cut, and whose frames are bounded, as ``LineWriter`` writes
    it.  A JSON observer gets the real failure: it serialises it and escapes itself."""

    def __init__(self, failure) -> None:
        self.failure = failure

    def getTraceback(self, *args, **kwargs) -> str:  # noqa: N802 (Failure's name)
        return bounded_traceback(self.failure)

    def __getattr__(self, name):
        return getattr(self.failure, name)


def guard_launcher_log(launcher_options, *, rate_interval: float = 60.0
                       ) -> RateLimit | None:
    """Under ``twist``, whose own observer writes the log: put policyd's ``RateLimit``
    and ``Escaped`` in front of it, so that its log keeps the same promises (one event
    one line, outsiders' warnings a few a minute) as policyd's own writer.

    twist makes the service first and only then builds its observer with the factory
    in its options (``Twist.main``: ``service()``, then ``run()`` reads
    ``fileLogObserverFactory``), so wrapping that factory here puts the filter before
    every event, the ones logged while starting included (replayed from the start-up
    buffer).  ``launcher_options``: twist's options (``Options.parent``).  The limiter
    to ``tick()`` every second, or ``None`` if the launcher has no such factory
    (nothing changed then)."""
    if launcher_options is None:
        return None
    try:
        factory = launcher_options["fileLogObserverFactory"]
    except (KeyError, TypeError):
        return None
    if not callable(factory):
        return None
    limiter = RateLimit(None, interval=rate_interval)
    from twisted.logger import jsonFileLogObserver

    def guarded_factory(log_file):
        limiter.observer = Escaped(factory(log_file),
                                   tracebacks=factory is not jsonFileLogObserver)
        return limiter

    launcher_options["fileLogObserverFactory"] = guarded_factory
    return limiter


def setup(daemon_config, stream: IO[str] | None = None,
          environ: Mapping[str, str] | None = None, *, primary: bool = True
          ) -> LogSetup | None:
    """Start the global log for the daemon (call once, before the reactor runs).

    ``primary=False`` under ``twist``, which starts the global log itself: then only a
    configured ``log_file`` gets policyd's own writer (added beside twist's output), and
    without one nothing is set up here (``None``)."""
    environ = os.environ if environ is None else environ
    if not primary and daemon_config.log_file is None:
        return None
    if daemon_config.log_file is not None:
        path = str(daemon_config.log_file)
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            out = _open(path)
        except OSError as error:
            from .config import ConfigError

            raise ConfigError(f"[daemon] log_file = {path}: cannot open it for writing: "
                              f"{error.strerror or error}") from None
        journal = False
    else:
        path = None
        out = stream if stream is not None else sys.stdout
        if out is sys.stdout or out is sys.__stdout__:
            out = _stdout_stream(out)
        elif hasattr(out, "reconfigure"):
            out.reconfigure(errors="backslashreplace")
        journal = bool(environ.get("JOURNAL_STREAM"))
    writer, observer = make_observer(daemon_config.log_level, out, journal=journal)
    if primary:
        globalLogBeginner.beginLoggingTo([observer], discardBuffer=True,
                                         redirectStandardIO=False)
    else:
        globalLogPublisher.addObserver(observer)
    return LogSetup(writer, path, observer.observer)
