"""One listener per configured endpoint string: bind, report, stop.

A failed bind aborts start-up with an error that names the configuration key; a stale
Unix socket left by a killed daemon is removed, with its lock even when the lock's PID
now belongs to another process, while a live one (another daemon) is an error.
``raise_nofile_limit`` is for start-up: the soft descriptor limit up to the hard one.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
import stat

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import UNIXServerEndpoint, serverFromString
from twisted.logger import Logger
from twisted.python.failure import Failure

from .config import ConfigError
from .errors import ListenError
from .runtime.adopted import listen as _listen

log = Logger(namespace="policyd")

__all__ = ["Listener", "parse_endpoint", "raise_nofile_limit", "unix_path"]


class Listener(Service):
    """Listen on one configured endpoint string; a failure aborts start-up.

    Like ``strports.service`` (the endpoint is built with ``serverFromString``), but the
    error names the configuration key, and a stale Unix socket left by a killed daemon is
    removed while a live one (another daemon) is an error.
    """

    def __init__(self, reactor, kind: str, key: str, description: str, factory,
                 endpoint=None, path: str | None = None) -> None:
        self.reactor = reactor
        self.kind = kind
        self.key = key
        self.description = description
        self.factory = factory
        self.endpoint = endpoint if endpoint is not None else \
            parse_endpoint(reactor, key, description)
        # The Unix socket's path (``None`` for TCP and systemd-passed sockets): given with
        # an explicit endpoint, else read from the description, not from the endpoint's
        # private attributes.
        self.path = path if endpoint is not None else unix_path(description)
        self.port = None
        if getattr(factory, "listener_name", False) is None:
            factory.listener_name = f"{key} {description}"

    @property
    def address(self) -> str:
        if self.port is None:
            return "-"
        host = self.port.getHost()
        if hasattr(host, "port"):
            return f"{getattr(host, 'type', 'TCP').lower()}:{host.host}:{host.port}"
        name = getattr(host, "name", None)
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        return f"unix:{name}"

    def startService(self) -> None:
        self._clear_stale_socket()
        results: list = []
        d = _listen(self.reactor, self.endpoint, self.factory)
        d.addBoth(results.append)
        if not results:
            # An endpoint that listens asynchronously: wait for it in the background.
            d.cancel()
            raise ListenError(f"{self.key} = {self.description}: the endpoint did not "
                              "listen at once")
        result = results[0]
        if isinstance(result, Failure):
            error = result.value
            raise ListenError(f"{self.key} = {self.description}: cannot listen: "
                              f"{_error_text(error)}")
        self.port = result
        tune = getattr(self.factory, "tune_port", None)
        if tune is not None:  # ``policyd.runtime.tuning``: before the first accept
            tune(result)
        super().startService()

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return defer.maybeDeferred(port.stopListening)
        return None

    def status(self) -> dict:
        factory = self.factory
        return {"kind": self.kind, "key": self.key, "endpoint": self.description,
                "address": self.address, "connections": len(factory.connections),
                "refused": getattr(factory, "refused", 0),
                "evicted": getattr(factory, "evicted", 0),
                "share_refused": getattr(factory, "share_refused", 0),
                "share_evicted": getattr(factory, "share_evicted", 0),
                "open_incidents": len(getattr(factory, "incidents", ()))}

    def _clear_stale_socket(self) -> None:
        """Before binding a Unix socket: its directory must exist; a socket somebody
        serves (a connection is accepted) is another daemon's: an error, left alone.
        Nobody serving it, the socket file and any ``<socket>.lock`` are stale, whatever
        PID the lock names (PIDs are reused after a crash or a reboot): both are
        removed, and a lock naming a live process is logged as taken over."""
        path = self.path
        if path is None:
            return
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            what = "is not a directory" if os.path.exists(directory) else "does not exist"
            raise ListenError(f"{self.key} = {self.description}: the socket's directory "
                              f"{directory} {what}")
        exists = self._check_not_served(path)
        self._take_stale_lock(path + ".lock", path)
        if exists:
            os.unlink(path)
            log.info("removed the stale socket {path} left by an earlier run", path=path)

    def _check_not_served(self, path: str) -> bool:
        """Whether a socket file is there that nobody serves; an error if served."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenError(f"{self.key} = {self.description}: {path} exists and is not "
                              "a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError as error:
            if error.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return error.errno == errno.ECONNREFUSED
            raise ListenError(f"{self.key} = {self.description}: cannot check the "
                              f"existing socket {path}: {_error_text(error)}") from None
        finally:
            probe.close()
        raise ListenError(f"{self.key} = {self.description}: another process is already "
                          f"listening on {path}")

    def _take_stale_lock(self, lock: str, path: str) -> None:
        try:
            target = os.readlink(lock)
        except FileNotFoundError:
            return
        except OSError:  # not a symlink: Twisted's lock is one; leave it to Twisted
            return
        try:
            pid = int(target)
        except ValueError:
            pid = None
        alive = pid is not None and _pid_alive(pid)
        try:
            os.unlink(lock)
        except FileNotFoundError:
            return
        except OSError as error:
            raise ListenError(f"{self.key} = {self.description}: cannot remove the stale "
                              f"lock {lock}: {_error_text(error)}") from None
        if alive:
            log.warn("took over the lock {lock}: its PID {pid} is alive but nobody serves "
                     "{path} (a PID reused after a crash or reboot)",
                     lock=lock, pid=pid, path=path)
        else:
            log.info("removed the stale lock {lock} of PID {pid}, no longer running",
                     lock=lock, pid=target)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, somebody else's
        return True
    return True


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (call once at start-up) and
    log the figure and what the MTA listeners may hold of it.  Returns (before, after).
    An unlimited hard limit is read as the kernel's ``fs.nr_open``."""
    from .protocols import PROCESS_LIMITS, RESERVED_DESCRIPTORS

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    after = soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            after = target
        except (OSError, ValueError) as error:
            log.warn("cannot raise the descriptor limit (RLIMIT_NOFILE) from {soft} to "
                     "{target}: {error}", soft=soft, target=target, error=error)
    PROCESS_LIMITS.refresh()
    log.info("descriptor limit (RLIMIT_NOFILE) {before}{change}: the Exim and Postfix "
             "listeners may hold {open} connections together, {reserve} are kept for the "
             "control socket and the store", before=soft,
             change=f" raised to {after}" if after != soft else " (the hard limit)",
             open=PROCESS_LIMITS.max_open, reserve=RESERVED_DESCRIPTORS)
    return soft, after


def _error_text(error: BaseException) -> str:
    if getattr(error, "socketError", None) is not None:
        inner = error.socketError
        return getattr(inner, "strerror", None) or str(inner)
    return str(error) or type(error).__name__


def unix_path(description: str) -> str | None:
    """The socket path of a ``unix:`` endpoint string (``unix:PATH[:k=v...]`` or
    ``unix:address=PATH``; ``\\:`` escapes a colon, as in Twisted's grammar), else
    ``None``."""
    if not description.startswith("unix:"):
        return None
    parts, current, escaped = [], [], False
    for ch in description[len("unix:"):]:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    for part in parts:
        key, eq, value = part.partition("=")
        if eq and key == "address":
            return value or None
    positional = [part for part in parts if "=" not in part]
    return positional[0] if positional and positional[0] else None


# The kernel's queue of connections not yet accepted, for a ``unix:`` or ``tcp:``
# listener that does not name its own ``backlog=``: Twisted's default (50) refused
# connects (EAGAIN on a Unix socket) when a burst of a hundred smtpd processes or Exim
# deliveries met a reactor busy for a moment.  The kernel caps it at somaxconn.
LISTEN_BACKLOG = 1024


def with_backlog(description: str) -> str:
    """``description`` with ``backlog=LISTEN_BACKLOG`` added unless it names one."""
    kind = description.partition(":")[0].strip().lower()
    if kind not in ("unix", "tcp", "tcp6") or "backlog=" in description:
        return description
    return f"{description}:backlog={LISTEN_BACKLOG}"


def parse_endpoint(reactor, key: str, description: str):
    """``serverFromString`` with a ``ConfigError`` that names the key."""
    try:
        endpoint = serverFromString(reactor, with_backlog(description))
        if isinstance(endpoint, UNIXServerEndpoint) and not unix_path(description):
            raise ValueError("no socket path")
        return endpoint
    except Exception as error:  # the parsers raise ValueError, KeyError, IndexError...
        raise ConfigError(
            f"{key} = {description}: not a usable listener ({error}); allowed: Twisted "
            "endpoint strings such as unix:/run/policyd/exim.sock:mode=660, "
            "tcp:10040:interface=127.0.0.1, systemd:domain=UNIX:index=0") from None


