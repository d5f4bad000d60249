"""``policyd --config PATH``: run the daemon in the foreground (systemd, ``make run``).

Exit status: 0 after SIGTERM/SIGINT (listeners closed, connections in flight given
``[daemon] shutdown_grace`` seconds), 2 for a configuration error, 1 when start-up fails
(a listener cannot bind, the store cannot be opened).  SIGHUP reloads the data and reopens
the log file.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .config import ConfigError, check_paths, default_path


def _parser(environ) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="policyd",
        description="SMTP-time mailing-list posting policy daemon for Postfix and Exim.")
    parser.add_argument("-c", "--config", default=default_path(environ),
                        help="configuration file (default: $POLICYD_CONFIG or "
                             "/etc/policyd/policyd.conf)")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the configuration file and exit")
    parser.add_argument("--version", action="version", version=f"policyd {__version__}")
    return parser


def main(argv=None, environ=None) -> int:
    environ = os.environ if environ is None else environ
    args = _parser(environ).parse_args(argv)
    if args.check_config:
        # Every check start-up and the first answers would hit (``policyd.check``), the
        # path checks of ``config.check_paths`` included; ``systemd:`` listeners noted.
        from .check import check_config

        return check_config(args.config, sys.stdout, sys.stderr)
    from .tap import load_config

    try:
        config = load_config(args.config)
        check_paths(config)  # log_file writable, socket directories there (issue 13)
    except ConfigError as error:
        print(f"policyd: {error}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"policyd: {config.source}: configuration OK")
        return 0

    notes = []
    if "twisted.internet.reactor" not in sys.modules:
        from .runtime.reactor import install

        _, why = install(config.runtime.reactor)
        if why is not None:
            notes.append(f"reactor: Twisted's stock epoll reactor, because {why}")
    from twisted.internet import reactor
    from twisted.logger import Logger

    from .errors import ListenError
    from .tap import Options, makeService

    options = Options(environ)
    options.loaded = config
    options["config"] = args.config
    options.launcher = "policyd"
    options.runtime_notes = notes
    log = Logger(namespace="policyd")
    try:
        service = makeService(options)
    except ConfigError as error:  # found while setting up (the log file, say)
        print(f"policyd: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        log.failure("cannot open the store {url}", url=config.store.url)
        print(f"policyd: cannot open the store: {error}", file=sys.stderr)
        return 1
    logs = service.logs
    try:
        service.startService()
    except (ListenError, OSError) as error:
        log.critical("start-up failed: {error}", error=error)
        logs.flush()
        print(f"policyd: start-up failed: {config.source}: {error}", file=sys.stderr)
        try:
            service.backend.close()
        except Exception:
            pass
        cleanup = getattr(error, "cleanup", None)
        if cleanup is not None:  # let the listeners that did bind close their sockets
            reactor.callWhenRunning(cleanup.addBoth, lambda _: reactor.stop())
            reactor.run(installSignalHandlers=False)
        logs.close()
        return 1
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    logs.close()
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
