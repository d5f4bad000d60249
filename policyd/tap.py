"""``twist policyd``: the command-line ``Options`` and ``makeService(options, reactor)``.

The configuration is loaded and validated while the options are parsed (a bad file stops
start-up with a usage error naming the file, the key and what is allowed), including every
listener endpoint string.  ``makeService`` builds the ``PolicyService`` without starting
it, so tests can pass a ``MemoryReactor`` and a fake store backend.
"""

from __future__ import annotations

import os

from twisted.python import usage

from .config import Config, ConfigError, default_path, load
from .listeners import parse_endpoint
from .service import PolicyService


def listener_keys(config: Config):
    for description in config.exim.listen:
        yield "[exim] listen", description
    for description in config.postfix.listen:
        yield "[postfix] listen", description


def load_config(path) -> Config:
    """Load the file and check that every listener is a usable endpoint string."""
    config = load(path)
    for key, description in listener_keys(config):
        try:
            parse_endpoint(None, key, description)
        except ConfigError as error:
            raise ConfigError(f"{config.source}: {error}") from None
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
        except ConfigError as error:
            raise usage.UsageError(str(error)) from None


def makeService(options, reactor=None, backend=None) -> PolicyService:
    """The daemon's service.  With ``reactor=None`` the global reactor is used and SIGHUP
    is handled (reload the data); tests pass their own reactor and backend."""
    config = getattr(options, "loaded", None) or load_config(options["config"])
    install_signals = reactor is None
    if reactor is None:
        from twisted.internet import reactor
    if backend is None:
        from .store import open_backend

        backend = open_backend(config.store)
    return PolicyService(config, reactor, backend, install_signals=install_signals)
