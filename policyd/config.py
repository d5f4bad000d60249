"""Load, validate and freeze the configuration file.

The file is INI (``configparser``, no interpolation).  Every key is declared here with its
type and default; an unknown section or key, or a bad value, is a ``ConfigError`` whose
message names the file, the key and what is allowed.  Relative paths are relative to the
directory of the configuration file, so a whole setup can live in one folder.
"""

from __future__ import annotations

import configparser
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from .core.replies import (DISCARD_OUTCOMES, HOLD_OUTCOMES, PERMANENT_CODES, TEMPORARY_CODES,
                           Outcome, ReplyPolicy)
from .core.snapshot import NO_SITE_CHECKS, SiteHeaderChecks
from .core.rules import ROLE_LOCAL_PARTS


class ConfigError(Exception):
    """A configuration problem, worded for the admin who has to fix it."""


@dataclass(frozen=True)
class StoreTimeouts:
    """How long one store access may wait, in seconds (``policyd.store.engine``).

    ``connect``: to open a connection; ``statement``: for one statement (server-side:
    PostgreSQL ``statement_timeout``, MariaDB ``max_statement_time``, plus a client-side
    socket read timeout on MariaDB); ``lock``: for a lock (PostgreSQL ``lock_timeout``,
    MariaDB ``innodb_lock_wait_timeout`` and ``lock_wait_timeout``, SQLite's busy
    timeout)."""

    connect: float = 10.0
    statement: float = 60.0
    lock: float = 10.0


@dataclass(frozen=True)
class StoreConfig:
    backend: str
    url: str
    refresh_interval: float
    timeouts: StoreTimeouts = StoreTimeouts()
    # A refresh still running after this many seconds makes ``status`` unhealthy.
    refresh_timeout: float = 30.0
    # Seconds without the store confirming the snapshot as its current state after which
    # every list query gets the temporary failure (``SnapshotService.stale_reason``); 0: never.
    max_stale: float = 900.0
    # Both backends: a verification build (full, compared with the incremental result)
    # every this many seconds; 0 disables it.
    verify_interval: float = 600.0
    # Native store on PostgreSQL: LISTEN for the triggers' NOTIFY and refresh at once
    # (``policyd.change_listener``); ignored by a store that cannot notify.
    listen_notify: bool = True
    # Native store on SQLite: seconds between looks at the database's files
    # (``policyd.sqlite_watch``); 0: poll every ``refresh_interval`` only.
    watch_interval: float = 0.25
    # ``[mailman] config_file``: Mailman's site ``[antispam] header_checks`` and
    # ``jump_chain`` (``policyd.mailman_site``), carried into every snapshot the store
    # builds (the lines Mailman and policyd skip: ``site_header_checks.notes``).
    site_header_checks: SiteHeaderChecks = NO_SITE_CHECKS


@dataclass(frozen=True)
class DaemonConfig:
    state_dir: Path
    control_socket: Path
    control_socket_mode: int
    log_file: Path | None
    log_level: str
    shutdown_grace: float
    fail_closed: bool = True


@dataclass(frozen=True)
class RuntimeConfig:
    """``[runtime]``: the switches of ``policyd.runtime`` (each documented there)."""

    reactor: bool = True
    fast_write: bool = True
    fast_read: bool = True
    fast_accept: bool = True
    turn_writes: bool = True
    pacing: bool = True
    heap: bool = True
    store_niceness: int = 19
    switch_interval: float = 0.0005


@dataclass(frozen=True)
class EximConfig:
    listen: tuple[str, ...]
    timeout: float
    max_request: int
    max_connections: int = 1000
    # [daemon] max_buffered, for the limits all listeners share.
    max_buffered: int = 32 << 20


@dataclass(frozen=True)
class PostfixConfig:
    listen: tuple[str, ...]
    mode: str
    accept_action: str
    idle_timeout: float
    max_line: int
    max_attributes: int
    max_request: int
    request_timeout: float = 10.0
    max_connections: int = 1000
    # [daemon] max_buffered, for the limits all listeners share.
    max_buffered: int = 32 << 20


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: the Prometheus endpoint (``policyd.metrics``), off when ``listen``
    is empty; ``per_list`` adds answers per list (one series per list and verdict)."""

    listen: str = ""
    per_list: bool = False


@dataclass(frozen=True)
class RulesConfig:
    """``[rules]``: ``null_sender = reject`` (the ``null-sender`` rule: <> may only write
    to -bounces) or ``mailman`` (no such rule: the list's chain decides, as Mailman);
    ``role_addresses``: the local parts the ``role-address`` rule leaves to the MTA in a
    list domain (``postmaster``, ``abuse``)."""

    null_sender: str = "reject"
    role_addresses: frozenset[str] = ROLE_LOCAL_PARTS


@dataclass(frozen=True)
class ModerationConfig:
    """``[moderation]``: the timings and caps of SMTP-time moderation (lists with
    ``smtp_moderation`` set; ``core.moderation.Settings``) and how often each daemon
    syncs its state with the store."""

    min_delay: float = 300.0
    max_age: float = 86400.0
    remember: float = 30 * 86400.0
    decide_within: float = 3 * 86400.0
    max_entries: int = 100_000
    max_tickets: int = 10_000
    sync_interval: float = 5.0


@dataclass(frozen=True)
class DmarcConfig:
    """``[dmarc]``: the DNS lookups of ``dmarc-mitigation`` (``policyd.dmarc_lookup``).
    ``nameservers`` empty: those of /etc/resolv.conf, read at start-up."""

    nameservers: tuple[tuple[str, int], ...] = ()
    timeout: float = 2.0
    cache_ttl: float = 3600.0
    failure_ttl: float = 60.0
    cache_size: int = 10000
    public_suffix_list: Path = Path("/usr/share/publicsuffix/public_suffix_list.dat")


@dataclass(frozen=True)
class Config:
    source: str
    store: StoreConfig
    daemon: DaemonConfig
    exim: EximConfig
    postfix: PostfixConfig
    smtp: ReplyPolicy
    runtime: RuntimeConfig = RuntimeConfig()
    metrics: MetricsConfig = MetricsConfig()
    rules: RulesConfig = RulesConfig()
    moderation: ModerationConfig = ModerationConfig()
    dmarc: DmarcConfig = DmarcConfig()


# --- value parsers: each raises ValueError with the "allowed" wording ------------------


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        value = value.strip().lower()
        if value not in allowed:
            raise ValueError("allowed: " + ", ".join(allowed))
        return value
    return parse


def _nameservers(value: str) -> tuple[tuple[str, int], ...]:
    """``host``, ``host:port`` or ``[v6]:port``, separated by spaces or commas."""
    out = []
    for word in value.replace(",", " ").split():
        host, port = word, "53"
        if word.startswith("["):
            host, _, rest = word[1:].partition("]")
            if rest and not rest.startswith(":"):
                port = ""  # "[::1]junk": refused below, not read as [::1]
            else:
                port = rest[1:] if rest else "53"
        elif word.count(":") == 1:
            host, port = word.split(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("allowed: name server addresses, each host, host:port or "
                             "[IPv6]:port, separated by spaces")
        out.append((host, int(port)))
    return tuple(out)


# Upper bounds of durations, in seconds.  Every duration key has one: a value past what
# its consumer can carry failed far from the configuration (PostgreSQL refuses a
# ``statement_timeout`` or ``lock_timeout`` above 2147483647 ms, about 24.8 days, on every
# connection; ``threading.Event.wait`` raises OverflowError past ``threading.TIMEOUT_MAX``
# and ended the SQLite watcher's thread), and none of them is useful that long.
SECOND = 1.0
DAY = 86400.0
WEEK = 7 * DAY
YEAR = 365 * DAY
_SPANS = {SECOND: "a second", DAY: "a day", WEEK: "a week", 30 * DAY: "30 days",
          YEAR: "a year"}


def _at_most(maximum: float) -> str:
    span = _SPANS.get(maximum)
    return f"at most {maximum:g}" + (f" ({span})" if span else "")


def _positive_float(maximum: float) -> Callable[[str], float]:
    """Seconds above 0 and at most ``maximum``."""
    allowed = f"allowed: a number of seconds greater than 0 and {_at_most(maximum)}"

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise ValueError(allowed) from None
        if not 0 < number <= maximum:
            raise ValueError(allowed)
        return number
    return parse


def _seconds_or_zero(maximum: float) -> Callable[[str], float]:
    """Seconds from 0 (off) to ``maximum``."""
    allowed = f"allowed: a number of seconds, 0 to disable, {_at_most(maximum)}"

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise ValueError(allowed) from None
        if not 0 <= number <= maximum:
            raise ValueError(allowed)
        return number
    return parse


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError("allowed: a whole number greater than 0") from None
    if number <= 0:
        raise ValueError("allowed: a whole number greater than 0")
    return number


def _mode(value: str) -> int:
    try:
        mode = int(value, 8)
    except ValueError:
        raise ValueError("allowed: an octal file mode such as 0660") from None
    if not 0 <= mode <= 0o777:
        raise ValueError("allowed: an octal file mode such as 0660")
    return mode


def _private_mode(value: str) -> int:
    mode = _mode(value)
    if mode & 0o007:
        raise ValueError("allowed: 0600 or 0660 (the control socket shows the counters and "
                         "reloads the data: never for every local user)")
    return mode


def _listeners(value: str) -> tuple[str, ...]:
    # Whitespace-separated; Twisted endpoint strings never contain unescaped whitespace.
    items = tuple(value.split())
    for item in items:
        kind = item.split(":", 1)[0]
        if kind not in ("unix", "tcp", "tcp6", "systemd", "ssl"):
            raise ValueError("allowed: Twisted endpoint strings such as "
                             "unix:/run/policyd/exim.sock:mode=660, "
                             "tcp:10040:interface=127.0.0.1, systemd:domain=UNIX:index=0")
    return items


def _metrics_listen(value: str) -> str:
    """One endpoint string, or empty (no metrics endpoint)."""
    value = value.strip()
    if not value:
        return ""
    if len(value.split()) != 1 or value.split(":", 1)[0] not in ("tcp", "tcp6", "unix",
                                                                  "systemd"):
        raise ValueError("allowed: empty (off), or one Twisted endpoint string such as "
                         "tcp:9163:interface=127.0.0.1")
    return value


def _switch(value: str) -> bool:
    word = value.strip().lower()
    if word in ("on", "yes", "true", "1"):
        return True
    if word in ("off", "no", "false", "0"):
        return False
    raise ValueError("allowed: on, off")


def _niceness(value: str) -> int:
    try:
        nice = int(value)
    except ValueError:
        nice = -1
    if not 0 <= nice <= 19:
        raise ValueError("allowed: a niceness from 0 (the daemon's own) to 19 (the lowest)")
    return nice


# A dot-atom local part (RFC 5322 atext and dots), as ``role-address`` compares it:
# lower case, without a ``+tag`` (the snapshot drops one before looking a list up).
_LOCAL_PART = re.compile(r"[a-z0-9!#$%&'*/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*/=?^_`{|}~-]+)*")


def _local_parts(value: str) -> frozenset[str]:
    """Local parts separated by commas or white space; empty: none."""
    out = set()
    for word in value.replace(",", " ").split():
        word = word.lower()
        if _LOCAL_PART.fullmatch(word) is None:
            raise ValueError(f"{word!r} is not a local part (allowed: local parts such as "
                             "postmaster, abuse, separated by commas; no @, no +tag, no "
                             "quotes; empty for none)")
        out.add(word)
    return frozenset(out)


def _text(value: str) -> str:
    if any(ch in value for ch in "\r\n\x00"):
        raise ValueError("allowed: one line of text")
    return value.strip()


def _code(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            code = int(value)
        except ValueError:
            code = -1
        if not low <= code <= high:
            raise ValueError(f"allowed: an SMTP code from {low} to {high}")
        return code
    return parse


def _status(first: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        parts = value.strip().split(".")
        if (len(parts) != 3 or parts[0] != first
                or not all(p.isdigit() and len(p) <= 3 for p in parts[1:])):
            raise ValueError(f"allowed: an enhanced status code such as {first}.7.1")
        return value.strip()
    return parse


_D = ReplyPolicy()

# The shortest ``[store] watch_interval``: a thread looking at SQLite's files more
# often would only spend the CPU (and the GIL) for nothing a mail server could notice.
MIN_WATCH_INTERVAL = 0.05

# section -> key -> (parser, default as text)
SCHEMA: Mapping[str, Mapping[str, tuple[Callable[[str], object], str]]] = {
    "store": {
        "backend": (_choice("native", "mailman3"), "native"),
        "url": (_text, ""),
        "refresh_interval": (_positive_float(DAY), "2"),
        "connect_timeout": (_positive_float(DAY), "10"),
        "statement_timeout": (_positive_float(DAY), "60"),
        "lock_timeout": (_positive_float(DAY), "10"),
        "refresh_timeout": (_positive_float(DAY), "30"),
        "max_stale": (_seconds_or_zero(WEEK), "900"),
        "verify_interval": (_seconds_or_zero(WEEK), "600"),
        "listen_notify": (_switch, "on"),
        "watch_interval": (_seconds_or_zero(DAY), "0.25"),
    },
    "daemon": {
        "state_dir": (_text, "/var/lib/policyd"),
        "control_socket": (_text, "/run/policyd/control.sock"),
        "control_socket_mode": (_private_mode, "0660"),
        "max_buffered": (_positive_int, str(32 << 20)),
        "log_file": (_text, ""),
        "log_level": (_choice("debug", "info", "warn", "error"), "info"),
        "shutdown_grace": (_positive_float(DAY), "10"),
        "fail_closed": (_switch, "on"),
    },
    "exim": {
        "listen": (_listeners, "unix:/run/policyd/exim.sock:mode=660"),
        "timeout": (_positive_float(DAY), "10"),
        "max_request": (_positive_int, "65536"),
        "max_connections": (_positive_int, "1000"),
    },
    "postfix": {
        "listen": (_listeners, "unix:/run/policyd/postfix.sock:mode=660"),
        "mode": (_choice("safe", "envelope"), "safe"),
        "accept_action": (_choice("dunno", "ok"), "dunno"),
        "idle_timeout": (_positive_float(DAY), "600"),
        "max_line": (_positive_int, "4096"),
        "max_attributes": (_positive_int, "100"),
        "max_request": (_positive_int, "65536"),
        "request_timeout": (_positive_float(DAY), "10"),
        "max_connections": (_positive_int, "1000"),
    },
    "metrics": {
        "listen": (_metrics_listen, ""),
        "per_list": (_switch, "off"),
    },
    "rules": {
        "null_sender": (_choice("reject", "mailman"), "reject"),
        "role_addresses": (_local_parts, "postmaster, abuse"),
    },
    "mailman": {
        "config_file": (_text, ""),
    },
    "moderation": {
        "min_delay": (_seconds_or_zero(30 * DAY), "300"),
        "max_age": (_positive_float(30 * DAY), "86400"),
        "remember": (_seconds_or_zero(YEAR), "2592000"),
        "decide_within": (_positive_float(30 * DAY), "259200"),
        "max_entries": (_positive_int, "100000"),
        "max_tickets": (_positive_int, "10000"),
        "sync_interval": (_positive_float(DAY), "5"),
    },
    "dmarc": {
        "nameservers": (_nameservers, ""),
        "timeout": (_positive_float(DAY), "2"),
        "cache_ttl": (_positive_float(WEEK), "3600"),
        "failure_ttl": (_positive_float(WEEK), "60"),
        "cache_size": (_positive_int, "10000"),
        "public_suffix_list": (_text, "/usr/share/publicsuffix/public_suffix_list.dat"),
    },
    "runtime": {
        "reactor": (_switch, "on"),
        "fast_write": (_switch, "on"),
        "fast_read": (_switch, "on"),
        "fast_accept": (_switch, "on"),
        "turn_writes": (_switch, "on"),
        "pacing": (_switch, "on"),
        "heap": (_switch, "on"),
        "store_niceness": (_niceness, "19"),
        "switch_interval": (_positive_float(SECOND), "0.0005"),
    },
    "smtp": {
        "hold": (_choice(*(o.value.lower() for o in HOLD_OUTCOMES)), "accept"),
        "discard": (_choice(*(o.value.lower() for o in DISCARD_OUTCOMES)), "discard"),
        "reject_code": (_code(*PERMANENT_CODES), str(_D.reject_code)),
        "reject_status": (_status("5"), _D.reject_status),
        "reject_text": (_text, _D.reject_text),
        "unknown_list_text": (_text, _D.unknown_list_text),
        "null_sender_text": (_text, _D.null_sender_text),
        "discard_reject_text": (_text, _D.discard_reject_text),
        "defer_code": (_code(*TEMPORARY_CODES), str(_D.defer_code)),
        "defer_status": (_status("4"), _D.defer_status),
        "defer_text": (_text, _D.defer_text),
        "error_code": (_code(*TEMPORARY_CODES), str(_D.error_code)),
        "error_status": (_status("4"), _D.error_status),
        "error_text": (_text, _D.error_text),
    },
}


def load(path: str | os.PathLike) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the configuration file: "
                          f"{error.strerror}") from None
    except UnicodeDecodeError as error:
        line = path.read_bytes()[:error.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 (byte "
                          f"{error.object[error.start]:#04x}); the configuration is read "
                          "as UTF-8") from None
    return parse(text, source=str(path), base=path.resolve().parent)


def parse(text: str, source: str = "<config>", base: Path | None = None) -> Config:
    parser = configparser.ConfigParser(interpolation=None, default_section="\0none")
    parser.optionxform = str  # keys are case-sensitive: a typo should not pass
    try:
        parser.read_string(text, source=source)
    except configparser.Error as error:
        raise ConfigError(f"{source}: {error}".replace("\n", " ")) from None
    values: dict[str, dict[str, object]] = {}
    for section in parser.sections():
        if section not in SCHEMA:
            raise ConfigError(f"{source}: unknown section [{section}] "
                              f"(allowed: {', '.join('[' + s + ']' for s in SCHEMA)})")
        for key in parser[section]:
            if key not in SCHEMA[section]:
                raise ConfigError(f"{source}: [{section}] unknown key {key!r} "
                                  f"(allowed: {', '.join(SCHEMA[section])})")
    for section, keys in SCHEMA.items():
        values[section] = {}
        for key, (convert, default) in keys.items():
            raw = parser.get(section, key, fallback=default)
            try:
                values[section][key] = convert(raw)
            except ValueError as error:
                raise ConfigError(f"{source}: [{section}] {key} = {raw.strip()!r} "
                                  f"is not valid ({error})") from None
    base = base or Path.cwd()

    def path_of(value: str) -> Path:
        return (base / value).resolve() if value else base

    d = values["daemon"]
    state_dir = path_of(d["state_dir"])
    s = values["store"]
    url = s["url"] or f"sqlite:///{state_dir / 'policyd.sqlite'}"
    if s["backend"] == "mailman3" and not s["url"]:
        raise ConfigError(f"{source}: [store] url must be set when backend = mailman3 "
                          "(allowed: an SQLAlchemy URL of the Mailman 3 database)")
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////") and base:
        relative = url[len("sqlite:///"):]
        if relative and relative != ":memory:" and not os.path.isabs(relative):
            url = f"sqlite:///{(base / relative).resolve()}"
    p = values["postfix"]
    if p["idle_timeout"] <= 300:
        raise ConfigError(f"{source}: [postfix] idle_timeout = {p['idle_timeout']:g} is not "
                          "valid (allowed: more than Postfix's 300 s max_idle)")
    if 0 < s["watch_interval"] < MIN_WATCH_INTERVAL:
        raise ConfigError(f"{source}: [store] watch_interval = {s['watch_interval']:g} is "
                          f"not valid (allowed: 0 to disable, or at least "
                          f"{MIN_WATCH_INTERVAL:g} s)")
    # A store that answers every refresh within refresh_timeout confirms the snapshot
    # at most two refreshes and the interval between them apart: max_stale must not trip
    # on that.
    slowest = s["refresh_interval"] + 2 * s["refresh_timeout"]
    if not parser.has_option("store", "max_stale") and 0 < s["max_stale"] <= slowest:
        # The default on a site that gives its refreshes longer: as much past the
        # slowest confirmation a healthy store can give as the default leaves past it.
        default = {key: float(SCHEMA["store"][key][1])
                   for key in ("max_stale", "refresh_interval", "refresh_timeout")}
        s["max_stale"] = slowest + default["max_stale"] - (
            default["refresh_interval"] + 2 * default["refresh_timeout"])
    if 0 < s["max_stale"] <= slowest:
        raise ConfigError(f"{source}: [store] max_stale = {s['max_stale']:g} is not valid "
                          f"(allowed: 0 to disable, or more than refresh_interval + 2 x "
                          f"refresh_timeout = {slowest:g} s, so that a store answering "
                          "in time never trips it)")
    m = values["moderation"]
    if m["min_delay"] >= m["max_age"]:
        raise ConfigError(f"{source}: [moderation] min_delay = {m['min_delay']:g} is not "
                          f"valid (allowed: less than max_age = {m['max_age']:g})")
    site = _mailman_site(source, values["mailman"]["config_file"], path_of)
    smtp = values["smtp"]
    return Config(
        source=source,
        store=StoreConfig(
            s["backend"], url, s["refresh_interval"],
            timeouts=StoreTimeouts(connect=s["connect_timeout"],
                                   statement=s["statement_timeout"],
                                   lock=s["lock_timeout"]),
            refresh_timeout=s["refresh_timeout"],
            max_stale=s["max_stale"],
            verify_interval=s["verify_interval"],
            listen_notify=s["listen_notify"],
            watch_interval=s["watch_interval"],
            site_header_checks=site),
        daemon=DaemonConfig(
            state_dir=state_dir,
            control_socket=path_of(d["control_socket"]),
            control_socket_mode=d["control_socket_mode"],
            log_file=path_of(d["log_file"]) if d["log_file"] else None,
            log_level=d["log_level"],
            shutdown_grace=d["shutdown_grace"],
            fail_closed=d["fail_closed"],
        ),
        runtime=RuntimeConfig(**values["runtime"]),
        metrics=MetricsConfig(**values["metrics"]),
        rules=RulesConfig(**values["rules"]),
        moderation=ModerationConfig(**m),
        dmarc=DmarcConfig(**{**values["dmarc"], "public_suffix_list": path_of(
            values["dmarc"]["public_suffix_list"])}),
        exim=EximConfig(**values["exim"], max_buffered=d["max_buffered"]),
        postfix=PostfixConfig(**p, max_buffered=d["max_buffered"]),
        smtp=ReplyPolicy(
            hold=Outcome(smtp.pop("hold").upper()),
            discard=Outcome(smtp.pop("discard").upper()),
            **smtp,
        ),
    )


def _mailman_site(source: str, config_file: str, path_of) -> SiteHeaderChecks:
    """``[mailman] config_file``: Mailman's site header checks, read now (start-up and
    ``--check-config`` refuse a file Mailman could not use either)."""
    if not config_file:
        return NO_SITE_CHECKS
    from . import mailman_site

    try:
        site, _ = mailman_site.load(path_of(config_file))
    except mailman_site.SiteConfigError as error:
        raise ConfigError(f"{source}: [mailman] config_file = {config_file}: {error} "
                          "(allowed: Mailman 3's mailman.cfg, readable by policyd)") from None
    return site


def listener_keys(config: Config):
    """(configuration key, endpoint string) of every listener a start-up would bind."""
    for description in config.exim.listen:
        yield "[exim] listen", description
    for description in config.postfix.listen:
        yield "[postfix] listen", description
    if config.metrics.listen:
        yield "[metrics] listen", config.metrics.listen


def default_path(environ: Mapping[str, str]) -> str:
    return environ.get("POLICYD_CONFIG", "/etc/policyd/policyd.conf")


def _unix_path(description: str) -> str | None:
    """The socket path of a ``unix:`` endpoint string (``\\:`` escapes a colon)."""
    if not description.startswith("unix:"):
        return None
    first = re.split(r"(?<!\\):", description[len("unix:"):], maxsplit=1)[0]
    path = re.sub(r"\\(.)", r"\1", first)
    if path.startswith("address="):
        path = path[len("address="):]
    return path or None


def check_paths(config: Config) -> None:
    """What ``--check-config`` and start-up check on the file system, each problem a
    ``ConfigError`` naming the key: ``[daemon] log_file`` is a file policyd can write
    (or create), and the directory of every Unix socket exists."""
    source = config.source
    log_file = config.daemon.log_file
    if log_file is not None:
        problem = _writable_file_problem(Path(log_file))
        if problem:
            raise ConfigError(f"{source}: [daemon] log_file = {log_file}: {problem} "
                              "(allowed: a file policyd can create or append to)")
    sockets = [("[daemon] control_socket", str(config.daemon.control_socket),
                str(config.daemon.control_socket))]
    sockets += [("[exim] listen", d, _unix_path(d)) for d in config.exim.listen]
    sockets += [("[postfix] listen", d, _unix_path(d)) for d in config.postfix.listen]
    if config.metrics.listen:
        sockets.append(("[metrics] listen", config.metrics.listen,
                        _unix_path(config.metrics.listen)))
    for key, description, path in sockets:
        if path is None:
            continue
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise ConfigError(f"{source}: {key} = {description}: the socket's path is "
                              f"{len(os.fsencode(path))} bytes, longer than the "
                              f"{MAX_SOCKET_PATH} a Unix socket's address holds (use a "
                              "shorter directory)")
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            what = "is not a directory" if os.path.exists(directory) else "does not exist"
            raise ConfigError(f"{source}: {key} = {description}: the socket's directory "
                              f"{directory} {what} (create it: under systemd, "
                              "RuntimeDirectory= makes /run/policyd, and the tmpfiles "
                              "example of docs/postfix.md /var/spool/postfix/policyd)")


# sun_path is 108 bytes on Linux, the last one the terminating NUL.
MAX_SOCKET_PATH = 107


def _writable_file_problem(path: Path) -> str | None:
    if path.exists() or path.is_symlink():
        if path.is_dir():
            return "is a directory"
        if not path.is_file():
            return "is not a regular file"
        if not os.access(path, os.W_OK):
            return "is not writable"
        return None
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: {parent} is not writable"
    if parent == path.parent:
        # Try it (root passes every access() check, and /proc or a read-only mount
        # still refuses): created, then removed, so a check leaves nothing behind.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except FileExistsError:
            return None
        except OSError as error:
            return f"cannot be created: {error.strerror or error}"
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
    return None
