"""tap.Options/makeService and the PolicyService it builds, on a MemoryReactor."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from twisted.application.service import IServiceMaker
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.plugin import getPlugins
from twisted.python import usage

from policyd import tap
from policyd.errors import ListenError, Unavailable
from policyd.service import PolicyService
from policyd.store.engine import safe_url as _safe_url
from policyd.core.verdict import Query

from .protocols.fakes import LIST, MEMBER, NONMEMBER, FakeBackend, SyncStoreThread


def write_config(tmp_path, text: str = "", **sections) -> str:
    body = (
        "[daemon]\n"
        f"state_dir = {tmp_path}\n"
        "control_socket = control.sock\n"
        "control_socket_mode = 0600\n"
        "shutdown_grace = 5\n"
        "[exim]\n"
        "listen = unix:exim.sock:mode=666 tcp:10031:interface=127.0.0.1\n"
        "[postfix]\n"
        "listen = tcp:10040:interface=127.0.0.1\n"
    ) + text
    path = tmp_path / "policyd.conf"
    path.write_text(body)
    return str(path)


def options_for(path) -> tap.Options:
    options = tap.Options(environ={})
    options.parseOptions(["--config", path])
    return options


def build(tmp_path, reactor=None, text: str = ""):
    reactor = reactor or MemoryReactorClock()
    backend = FakeBackend()
    options = options_for(write_config(tmp_path, text))
    service = tap.makeService(options, reactor=reactor, backend=backend)
    service.store_thread = SyncStoreThread()
    service.snapshots.run_in_thread = service.store_thread.run
    # Intervals on the test's clock, as the daemon measures them on the monotonic one.
    service.snapshots.monotonic = reactor.seconds
    return service, reactor, backend


def test_options_load_and_validate_the_config(tmp_path):
    options = options_for(write_config(tmp_path))
    assert options.loaded.exim.listen == ("unix:exim.sock:mode=666",
                                          "tcp:10031:interface=127.0.0.1")


def test_options_default_config_path_from_environment(tmp_path):
    path = write_config(tmp_path)
    options = tap.Options(environ={"POLICYD_CONFIG": path})
    options.parseOptions([])
    assert options["config"] == path


def test_bad_config_is_a_usage_error_naming_the_key(tmp_path):
    path = write_config(tmp_path, "[store]\nrefresh_interval = soon\n")
    with pytest.raises(usage.UsageError) as info:
        options_for(path)
    assert "[store] refresh_interval" in str(info.value)
    assert path in str(info.value)


@pytest.mark.parametrize("listen", ["tcp:notaport", "unix:", "tcp:10040:bogus=1"])
def test_unusable_endpoint_string_is_a_usage_error(tmp_path, listen):
    path = write_config(tmp_path)
    text = open(path).read().replace("tcp:10040:interface=127.0.0.1", listen)
    open(path, "w").write(text)
    with pytest.raises(usage.UsageError) as info:
        options_for(path)
    assert "[postfix] listen" in str(info.value)
    assert listen in str(info.value)
    assert "allowed" in str(info.value)


def test_make_service_listens_on_every_endpoint(tmp_path):
    service, reactor, backend = build(tmp_path)
    assert isinstance(service, PolicyService)
    assert reactor.tcpServers == []
    service.startService()
    try:
        ports = sorted((p[0], p[3]) for p in reactor.tcpServers)
        assert ports == [(10031, "127.0.0.1"), (10040, "127.0.0.1")]
        unix = {p[0]: p[3] for p in reactor.unixServers}
        assert unix["exim.sock"] == 0o666
        assert unix[str(tmp_path / "control.sock")] == 0o600
        kinds = [l["kind"] for l in service.status()["listeners"]]
        assert kinds == ["exim", "exim", "postfix", "control"]
        assert service.snapshots.current.version == "1"
    finally:
        service.stopService()


def test_failed_bind_aborts_start_and_names_the_key(tmp_path):
    class Busy(MemoryReactorClock):
        def listenTCP(self, port, factory, backlog=50, interface=""):
            if port == 10040:
                raise CannotListenError(interface, port, OSError(98, "Address already in use"))
            return super().listenTCP(port, factory, backlog, interface)

    service, reactor, backend = build(tmp_path, Busy())
    with pytest.raises(ListenError) as info:
        service.startService()
    message = str(info.value)
    assert "[postfix] listen = tcp:10040:interface=127.0.0.1" in message
    assert "Address already in use" in message
    assert not service.running
    assert backend.calls == []  # the store was never touched


def test_live_unix_socket_of_another_process_is_an_error(tmp_path):
    import socket

    path = tmp_path / "control.sock"
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(path))
    live.listen(1)
    try:
        service, reactor, _ = build(tmp_path)
        with pytest.raises(ListenError) as info:
            service.startService()
        assert "[daemon] control_socket" in str(info.value)
        assert "another process is already listening" in str(info.value)
    finally:
        live.close()


def test_stale_unix_socket_is_removed(tmp_path):
    import socket

    path = tmp_path / "control.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()
    service, reactor, _ = build(tmp_path)
    service.startService()
    assert not path.exists()  # removed; the MemoryReactor does not create a new one
    service.stopService()


def test_stop_closes_listeners_then_drains_connections(tmp_path):
    """SIGTERM: listeners close at once, an answer in flight is given up to
    shutdown_grace, then the rest is aborted and the store closed."""
    service, reactor, backend = build(tmp_path)
    service.startService()
    exim = service.factory("exim").buildProtocol(None)
    exim.callLater = reactor.callLater
    transport = StringTransport()
    exim.makeConnection(transport)
    exim.dataReceived(b"POLICYD/1 list=" + LIST.encode())
    idle = service.factory("postfix").buildProtocol(None)
    idle_transport = StringTransport()
    idle.makeConnection(idle_transport)
    d = service.stopService()
    results = []
    d.addCallback(results.append)
    assert idle_transport.disconnecting
    assert results == []
    exim.dataReceived(b" sender=\n")
    assert transport.value().startswith(b"REJECT 550 5.7.1 The null sender")
    exim.connectionLost(None)
    idle.connectionLost(None)
    assert results == [None]
    assert backend.calls[-1] == "close"


def test_stop_aborts_connections_after_the_grace(tmp_path):
    service, reactor, backend = build(tmp_path)
    service.startService()
    exim = service.factory("exim").buildProtocol(None)
    exim.callLater = reactor.callLater
    transport = StringTransport()
    aborted = []
    transport.abortConnection = lambda: (aborted.append(True), exim.connectionLost(None))
    exim.makeConnection(transport)
    exim.dataReceived(b"POLICYD/1")
    results = []
    service.stopService().addCallback(results.append)
    reactor.advance(4.9)
    assert results == [] and aborted == []
    reactor.advance(0.2)
    assert aborted == [True]
    assert results == [None]


def test_control_query_and_status(tmp_path):
    service, reactor, backend = build(tmp_path)
    service.startService()
    try:
        reactor.advance(1.5)
        result = service.control_query(Query(LIST, NONMEMBER, from_header=f"A <{MEMBER}>"))
        assert result["exim"] == "ACCEPT 250 2.1.5 accept"
        assert result["postfix"] == "DUNNO"
        assert result["snapshot"] == {"version": "1", "age": 1.5}
        json.dumps(result)
        status = service.status()
        json.dumps(status)
        assert status["counters"]["by_protocol"] == {"control": {"accept": 1}}
        assert status["snapshot"]["lists"] == 3
        assert status["store"]["healthy"] is True
        assert status["uptime"] == 1.5
        assert status["pid"] == os.getpid()
    finally:
        service.stopService()


def test_the_daemons_moderation_state_keeps_wall_clock_times(tmp_path):
    """The daemon's reactor counts monotonic seconds (``runtime.monotonic``), which mean
    nothing outside the process: SMTP-time moderation, whose times go to the store that
    other daemons and ``policyctl`` read, takes them from the wall clock."""
    reactor = MemoryReactorClock()
    reactor.advance(5.0)  # seconds since boot, say
    backend = FakeBackend()
    backend.moderation_engine = object()
    service = tap.makeService(options_for(write_config(tmp_path)), reactor=reactor,
                              backend=backend)
    before = time.time()
    stamp = service.moderation.state.clock()
    assert before <= stamp <= time.time()
    assert service.moderation.clock is reactor  # the sync runs on the reactor


def test_control_query_without_snapshot(tmp_path):
    service, reactor, backend = build(tmp_path)
    backend.fail = ConnectionError("refused")
    service.startService()
    try:
        with pytest.raises(Unavailable) as info:
            service.control_query(Query(LIST, NONMEMBER))
        assert "ConnectionError: refused" in str(info.value)
        assert "DEFER 451 4.3.0 " in str(info.value)
        line = service.control_factory.handle(b'{"op": "query", "recipient": "a@b"}')
        answer = json.loads(line)
        assert answer["ok"] is False and "no snapshot loaded yet" in answer["error"]
    finally:
        service.stopService()


def test_reload_and_sighup(tmp_path):
    service, reactor, backend = build(tmp_path)
    hooks = []
    service.on_sighup = lambda: hooks.append(True)
    service.startService()
    try:
        backend.calls.clear()
        results = []
        service.reload().addCallback(results.append)
        assert results[0]["reloaded"] is True
        assert backend.calls == ["load_snapshot"]  # a full build: no token asked first
        backend.calls.clear()
        service.sighup()
        assert hooks == [True]
        assert backend.calls == ["load_snapshot"]
        backend.fail = OSError("gone")
        results.clear()
        service.reload().addCallback(results.append)
        assert results[0] == {"reloaded": False, "snapshot": results[0]["snapshot"],
                              "error": "OSError: gone"}
    finally:
        service.stopService()


def test_reload_on_a_stuck_store_is_answered_still_running_and_sighups_join(tmp_path):
    """While a store refresh hangs: ``policyctl reload`` is answered after ``[store]
    refresh_timeout`` that the reload still runs and why (``reloaded`` false: exit 5),
    leaving no waiter behind; SIGHUPs meanwhile keep one waiter however many come; the
    one build after the stuck refresh serves them all."""
    from .protocols.fakes import ManualThread

    service, reactor, backend = build(tmp_path)
    service.startService()
    try:
        snapshots = service.snapshots
        thread = ManualThread()
        snapshots.run_in_thread = thread.run
        reactor.advance(snapshots.interval)  # this refresh hangs
        timeout = snapshots.refresh_timeout
        assert service.control_factory.reload_wait == timeout
        proto = service.control_factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(b'{"op": "reload"}\n')
        for _ in range(1000):
            service.sighup()
        assert len(snapshots._forced) == 2  # the control client and the first SIGHUP
        reactor.advance(timeout)
        answer = json.loads(transport.value())["result"]
        assert answer["reloaded"] is False and answer["running"] is True
        assert answer["error"] == (
            f"reload still running: a store refresh has been running for {timeout:.1f} s "
            f"(more than [store] refresh_timeout = {timeout:g} s: the store is stuck or "
            "very slow); the reload runs when it ends")
        assert len(snapshots._forced) == 1
        backend.calls.clear()
        thread.step()
        thread.step()
        assert backend.calls.count("load_snapshot") == 1
        assert not snapshots._forced and not snapshots._forced_running
        assert not service._sighup_waiting
    finally:
        service.stopService()


def test_signal_handler_installed_only_when_asked(tmp_path):
    service, reactor, backend = build(tmp_path)
    before = signal.getsignal(signal.SIGHUP)
    service.install_signals = True
    service.startService()
    assert signal.getsignal(signal.SIGHUP) is not before
    service.stopService()
    assert signal.getsignal(signal.SIGHUP) is before


def test_plugin_names_the_service_maker():
    makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
    assert "policyd" in makers
    maker = makers["policyd"]
    assert maker.module == "policyd.tap"
    assert maker.options is tap.Options
    assert maker.makeService is tap.makeService


def test_safe_url_hides_password():
    assert _safe_url("postgresql://u:secret@h/db") == "postgresql://u:***@h/db"
    assert _safe_url("sqlite:////x") == "sqlite:////x"


# --- policyd.logging: the daemon's log sink -----------------------------------------------

def _emit(observer, level, fmt, namespace="policyd.decision", **fields):
    from twisted.logger import Logger

    Logger(namespace=namespace, observer=observer).emit(level, fmt, **fields)


def test_log_lines_are_formatted_from_fields_and_filtered_by_level():
    import io

    from twisted.logger import LogLevel

    from policyd.logging import make_observer

    out = io.StringIO()
    writer, observer = make_observer("info", out)
    _emit(observer, LogLevel.debug, "hidden {x}", x=1)
    _emit(observer, LogLevel.info, "{protocol} {verdict} reply={reply!r}",
          protocol="exim", verdict="reject", reply="550 5.7.1 no")
    _emit(observer, LogLevel.info, "Port {p} Closed", namespace="log_legacy", p=1)
    _emit(observer, LogLevel.warn, "bad {x.real}", namespace="policyd.exim", x=3)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(" info [policyd.decision] exim reject reply='550 5.7.1 no'")
    assert lines[1].endswith(" warn [policyd.exim] bad 3")


def test_log_debug_level_keeps_twisted_legacy_lines():
    import io

    from twisted.logger import LogLevel

    from policyd.logging import make_observer

    out = io.StringIO()
    _, observer = make_observer("debug", out)
    _emit(observer, LogLevel.info, "Port {p} Closed", namespace="log_legacy", p=1)
    assert "Port 1 Closed" in out.getvalue()


def test_log_journal_mode_prefixes_priority_and_failure_traceback():
    import io

    from twisted.logger import LogLevel
    from twisted.python.failure import Failure

    from policyd.logging import make_observer

    out = io.StringIO()
    _, observer = make_observer("info", out, journal=True)
    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    _emit(observer, LogLevel.critical, "it broke", log_failure=failure)
    lines = out.getvalue().splitlines()
    assert lines[0] == "<2>[policyd.decision] it broke"
    assert all(line.startswith("<2>") for line in lines)
    assert any("ZeroDivisionError" in line for line in lines)


def test_decision_events_are_standard_events():
    """Without a direct writer, a decision line is a plain ``twisted.logger`` event."""
    from twisted.logger import LogLevel, globalLogPublisher

    from policyd.logging import DecisionLog

    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        DecisionLog().decision("exim", "accept", "l@x", "a@x", "a@x", "a@x", "r", "ACCEPT",
                               0.5, "id1")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    event = next(e for e in seen if e.get("log_namespace") == "policyd.decision")
    assert event["log_level"] is LogLevel.info and event["request_id"] == "id1"
    assert event["log_time"] > 0


def test_log_file_reopen(tmp_path):
    from twisted.logger import LogLevel

    from policyd.logging import LogSetup, LineWriter, _open

    path = tmp_path / "policyd.log"
    writer = LineWriter(_open(str(path)))
    logs = LogSetup(writer, str(path))
    _emit(writer, LogLevel.info, "one")
    logs.flush()
    path.rename(tmp_path / "policyd.log.1")
    logs.reopen()
    _emit(writer, LogLevel.info, "two")
    logs.close()
    assert "one" in (tmp_path / "policyd.log.1").read_text()
    assert "two" in path.read_text() and "one" not in path.read_text()


def test_a_log_reopen_that_fails_is_said_as_such(tmp_path):
    """SIGHUP after the log's directory was moved away: one warning that the reopen
    failed and the old file is still written (it said "left out 0 log lines: the log
    took them slower than they came")."""
    from twisted.logger import LogLevel, globalLogPublisher

    from policyd.logging import LogSetup, LineWriter, _open

    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "policyd.log"
    writer = LineWriter(_open(str(path)))
    logs = LogSetup(writer, str(path))
    directory.rename(tmp_path / "logs.old")
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        logs.reopen()
        writer.stream.sync()
        logs.flush()
    finally:
        globalLogPublisher.removeObserver(events.append)
    warned = [e for e in events if e.get("log_namespace") == "policyd.log"]
    assert len(warned) == 1
    assert "still writing to the log file opened before" in warned[0]["log_format"]
    assert "cannot reopen" in warned[0]["error"]
    assert "left out" not in warned[0]["log_format"]
    _emit(writer, LogLevel.info, "kept")
    logs.close()
    assert "kept" in (tmp_path / "logs.old" / "policyd.log").read_text()


class _ReadingPort:
    """An IListeningPort that records whether it accepts connections."""

    connected = True

    def __init__(self, name):
        self.name, self.reading = name, True

    def stopReading(self):
        self.reading = False

    def startReading(self):
        self.reading = True

    def stopListening(self):
        self.connected = False

    def getHost(self):
        from twisted.internet.address import UNIXAddress
        return UNIXAddress(self.name)


class _PortReactor(MemoryReactorClock):
    def listenUNIX(self, address, factory, backlog=50, mode=0o666, wantPID=0):
        port = _ReadingPort(address)
        self.ports = getattr(self, "ports", []) + [port]
        return port

    def listenTCP(self, port, factory, backlog=50, interface=""):
        return self.listenUNIX(f"tcp-{port}", factory)


class _ManualThread(SyncStoreThread):
    """Store jobs wait until the test releases them."""

    def __init__(self):
        self.jobs = []

    def run(self, f, *args, **kwargs):
        d = defer.Deferred()
        self.jobs.append((d, f, args, kwargs))
        return d

    def release(self):
        jobs, self.jobs = self.jobs, []
        for d, f, args, kwargs in jobs:
            try:
                d.callback(f(*args, **kwargs))
            except Exception as error:
                d.errback(error)


@pytest.mark.parametrize("fail", [False, True])
def test_mta_listeners_accept_only_after_the_first_snapshot_attempt(tmp_path, fail):
    """Bound at start (a bad bind still aborts), but connections wait in the backlog until
    the first load has finished, loaded or failed; the control socket answers at once."""
    service, reactor, backend = build(tmp_path, reactor=_PortReactor())
    thread = _ManualThread()
    service.store_thread = thread
    service.snapshots.run_in_thread = thread.run
    if fail:
        backend.fail = ConnectionError("refused")
    service.startService()
    try:
        mta = [l.port for l in service.listeners if l.kind != "control"]
        control = [l.port for l in service.listeners if l.kind == "control"]
        assert mta and not any(port.reading for port in mta)
        assert all(port.reading for port in control)
        thread.release()
        assert all(port.reading for port in mta)
    finally:
        service.stopService()


def test_mta_listeners_resume_after_the_first_load_wait(tmp_path):
    """A store that hangs does not keep the MTAs waiting past FIRST_LOAD_WAIT."""
    service, reactor, backend = build(tmp_path, reactor=_PortReactor())
    thread = _ManualThread()
    service.store_thread = thread
    service.snapshots.run_in_thread = thread.run
    service.startService()
    try:
        mta = [l.port for l in service.listeners if l.kind != "control"]
        reactor.advance(service.FIRST_LOAD_WAIT - 0.1)
        assert not any(port.reading for port in mta)
        reactor.advance(0.2)
        assert all(port.reading for port in mta)
    finally:
        service.stopService()


@pytest.mark.parametrize("description", [
    "unix:/run/policyd/exim.sock:mode=660", "unix:address=/tmp/a.sock:lockfile=1",
    "unix:/tmp/with\\:colon.sock", "unix:relative.sock:backlog=5"])
def test_unix_path_reads_the_socket_path_as_twisted_does(description):
    """The listener finds a Unix socket's path from the endpoint string itself (no
    private attribute of the endpoint); it agrees with Twisted's own parser."""
    from twisted.internet.endpoints import serverFromString

    from policyd.listeners import unix_path

    endpoint = serverFromString(MemoryReactorClock(), description)
    assert unix_path(description) == endpoint._address


def test_unix_path_of_other_endpoints_is_none():
    from policyd.listeners import unix_path

    assert unix_path("tcp:10040:interface=127.0.0.1") is None
    assert unix_path("systemd:domain=UNIX:index=0") is None


def test_mta_listeners_get_a_deep_accept_backlog(tmp_path):
    """Twisted's default backlog (50) refused connects in a burst (EAGAIN on a Unix
    socket, an MTA's deferral) while the reactor was busy for a moment: a ``unix:`` or
    ``tcp:`` listener without its own ``backlog=`` now asks for ``LISTEN_BACKLOG``; one
    that names it keeps it.  On a real socket listened by the endpoint (the reactor not
    running, so nothing is accepted): 200 connects wait in the queue."""
    import socket

    from twisted.internet import reactor as real_reactor
    from twisted.internet.protocol import Factory

    from policyd.listeners import LISTEN_BACKLOG, parse_endpoint

    assert parse_endpoint(None, "k", "tcp:10040:interface=127.0.0.1")._backlog == \
        LISTEN_BACKLOG
    assert parse_endpoint(None, "k", "unix:/x.sock:backlog=7")._backlog == 7

    path = tmp_path / "s.sock"
    ports = []
    parse_endpoint(real_reactor, "k", f"unix:{path}:mode=600").listen(
        Factory.forProtocol(Factory)).addCallback(ports.append)
    clients = []
    try:
        for _ in range(200):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            clients.append(client)
            client.setblocking(False)
            client.connect(str(path))  # BlockingIOError (EAGAIN) once the queue is full
    finally:
        for client in clients:
            client.close()
        for port in ports:
            port.stopListening()
    assert len(ports) == 1
