"""One listener per configured endpoint string: bind, report, stop.

A failed bind aborts start-up with an error that names the configuration key; a stale
Unix socket left by a killed daemon is removed, while a live one (another daemon) is an
error.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import UNIXServerEndpoint, serverFromString
from twisted.logger import Logger
from twisted.python.failure import Failure

from .config import ConfigError
from .errors import ListenError

log = Logger(namespace="policyd")

__all__ = ["Listener", "parse_endpoint"]


class Listener(Service):
    """Listen on one configured endpoint string; a failure aborts start-up.

    Like ``strports.service`` (the endpoint is built with ``serverFromString``), but the
    error names the configuration key, and a stale Unix socket left by a killed daemon is
    removed while a live one (another daemon) is an error.
    """

    def __init__(self, reactor, kind: str, key: str, description: str, factory,
                 endpoint=None) -> None:
        self.reactor = reactor
        self.kind = kind
        self.key = key
        self.description = description
        self.factory = factory
        self.endpoint = endpoint if endpoint is not None else \
            parse_endpoint(reactor, key, description)
        self.port = None

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
        d = self.endpoint.listen(self.factory)
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
        super().startService()

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return defer.maybeDeferred(port.stopListening)
        return None

    def status(self) -> dict:
        return {"kind": self.kind, "key": self.key, "endpoint": self.description,
                "address": self.address, "connections": len(self.factory.connections)}

    def _clear_stale_socket(self) -> None:
        if not isinstance(self.endpoint, UNIXServerEndpoint):
            return
        path = self.endpoint._address
        try:
            st = os.stat(path)
        except OSError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenError(f"{self.key} = {self.description}: {path} exists and is not "
                              "a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError as error:
            if error.errno in (errno.ECONNREFUSED, errno.ENOENT):
                os.unlink(path)
                log.info("removed the stale socket {path} left by an earlier run",
                              path=path)
                return
            raise ListenError(f"{self.key} = {self.description}: cannot check the "
                              f"existing socket {path}: {_error_text(error)}") from None
        finally:
            probe.close()
        raise ListenError(f"{self.key} = {self.description}: another process is already "
                          f"listening on {path}")


def _error_text(error: BaseException) -> str:
    if getattr(error, "socketError", None) is not None:
        inner = error.socketError
        return getattr(inner, "strerror", None) or str(inner)
    return str(error) or type(error).__name__


def parse_endpoint(reactor, key: str, description: str):
    """``serverFromString`` with a ``ConfigError`` that names the key."""
    try:
        endpoint = serverFromString(reactor, description)
        if isinstance(endpoint, UNIXServerEndpoint) and not endpoint._address:
            raise ValueError("no socket path")
        return endpoint
    except Exception as error:  # the parsers raise ValueError, KeyError, IndexError...
        raise ConfigError(
            f"{key} = {description}: not a usable listener ({error}); allowed: Twisted "
            "endpoint strings such as unix:/run/policyd/exim.sock:mode=666, "
            "tcp:10040:interface=127.0.0.1, systemd:domain=UNIX:index=0") from None


