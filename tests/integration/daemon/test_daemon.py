"""The real ``policyd`` process on a SQLite store: both protocols over Unix and TCP
sockets, the control socket through ``policyctl``, live data changes, signals, start-up
failures."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest

from policyd import control_client

from .conftest import (
    BIN,
    LIST,
    MEMBER,
    NONMEMBER,
    REFRESH,
    REPO,
    PostfixClient,
    exim_ask,
    exim_line,
    postfix_request,
    wait_until,
)

pytestmark = pytest.mark.integration

REJECT = (b"REJECT 550 5.7.1 Posting to test@lists.example.com is restricted to its "
          b"members; your message was not accepted")
ACCEPT = b"ACCEPT 250 2.1.5 accept"
TEMPFAIL = b"DEFER 451 4.3.0 List policy service temporarily unavailable, please try again later"


def test_both_protocols_over_unix_and_tcp_and_control(run, daemons):
    run.write_config()
    run.fill()
    daemon = daemons(run)
    status = daemon.wait_ready()
    assert [l["kind"] for l in status["listeners"]] == ["exim", "exim", "postfix", "postfix",
                                                        "control"]
    assert oct(os.stat(run.exim_socket).st_mode & 0o777) == "0o666"
    assert oct(os.stat(run.control).st_mode & 0o777) == "0o600"

    for address in (run.exim_socket, ("127.0.0.1", run.exim_port)):
        # answered at half-close (Exim's shutdown=yes) and at the newline (shutdown=no)
        assert exim_ask(address, exim_line(LIST, NONMEMBER)) == REJECT
        assert exim_ask(address, exim_line(LIST, MEMBER) + b"\n", half_close=False) == ACCEPT
        # a member's From: with a forwarder's envelope sender
        assert exim_ask(address, exim_line(LIST, "srs0=x@fwd.example",
                                           f"Alice <{MEMBER}>")) == ACCEPT
        assert exim_ask(address, exim_line(f"{LIST},nosuch@lists.example.com", MEMBER)) == \
            b"REJECT 550 5.1.1 No such list: nosuch@lists.example.com"
        assert exim_ask(address, b"GARBAGE\n").startswith(b"DEFER 451 4.3.0 Malformed")

    for address in (run.postfix_socket, ("127.0.0.1", run.postfix_port)):
        client = PostfixClient(address)
        try:
            assert client.ask(LIST, NONMEMBER) == b"action=DUNNO"  # safe mode
            assert client.ask(LIST, "") == \
                b"action=550 5.7.1 The null sender may not write to test@lists.example.com"
            assert client.ask("nosuch@lists.example.com", MEMBER) == \
                b"action=550 5.1.1 No such list: nosuch@lists.example.com"
            assert client.ask(LIST, MEMBER, state="DATA") == b"action=DUNNO"
            # pipelined requests on the same connection, answered in order
            client.send(postfix_request(LIST, "") + postfix_request(LIST, MEMBER))
            assert client.read_answer().startswith(b"action=550 5.7.1")
            assert client.read_answer() == b"action=DUNNO"
            # malformed: answered, connection kept
            client.send(b"request=smtpd_access_policy\nnonsense\n\n")
            assert client.read_answer().startswith(b"action=451 4.3.0 Malformed")
            assert client.ask(LIST, MEMBER) == b"action=DUNNO"
        finally:
            client.close()

    # policyctl through the control socket: the same answer as the MTA, with the trace
    done = run.policyctl("query", LIST, NONMEMBER, "--explain")
    assert "exim:     " + REJECT.decode() in done.stdout
    assert "postfix:  action=DUNNO" in done.stdout
    assert "nonmember-moderation" in done.stdout
    result = control_client.query(run.control, LIST, NONMEMBER)
    assert result["exim"] == REJECT.decode()
    assert result["decision"]["rule"] == "nonmember-moderation"

    status = daemon.status()
    counters = status["counters"]["by_protocol"]
    assert counters["exim"]["reject"] == 4 and counters["exim"]["malformed"] == 2
    assert counters["postfix"]["reject"] == 8 and counters["postfix"]["other-state"] == 2
    answers = status["counters"]["answers"]
    assert answers["postfix"] == {"DUNNO": 8, "REJECT": 6, "DEFER": 2}
    assert answers["exim"] == {"REJECT": 4, "ACCEPT": 4, "DEFER": 2}  # one per request
    assert status["snapshot"]["lists"] == 1 and status["snapshot"]["memberships"] == 1
    assert status["store"]["healthy"] is True
    assert "sqlite" in status["store"]["describe"]
    done = run.policyctl("status")
    assert "uptime" in done.stdout and "memberships: 1" in done.stdout

    # one log line per decision, with list, senders, verdict, rule and reply
    wait_until(lambda: "exim reject list=test@lists.example.com sender=<bob@example.net>"
               in daemon.text(), 5, "the decision log line")
    line = next(l for l in daemon.text().splitlines()
                if "exim reject list=test@lists.example.com sender=<bob@example.net>" in l)
    assert "rule=nonmember-moderation" in line and "reply='REJECT 550 5.7.1" in line
    assert "ms" in line

    assert daemon.terminate() == 0
    assert not run.exim_socket.exists() and not run.control.exists()


def test_policyctl_changes_are_seen_within_the_refresh_interval(run, daemons):
    run.write_config()
    run.fill()
    daemon = daemons(run)
    daemon.wait_ready()
    pid = daemon.proc.pid
    before = daemon.status()["snapshot"]["version"]
    assert exim_ask(run.exim_socket, exim_line(LIST, NONMEMBER)) == REJECT

    run.policyctl("member", "add", LIST, NONMEMBER)
    wait_until(lambda: exim_ask(run.exim_socket, exim_line(LIST, NONMEMBER)) == ACCEPT,
               REFRESH * 20 + 5, "the new member to be accepted")
    assert daemon.status()["snapshot"]["version"] != before

    run.policyctl("list", "set", LIST, "--emergency", "on")
    wait_until(lambda: exim_ask(run.exim_socket, exim_line(LIST, MEMBER))
               .startswith(b"ACCEPT 250 2.6.0"), REFRESH * 20 + 5,
               "emergency moderation to hold posts")
    other = LIST.replace("test@", "other@")
    run.policyctl("list", "add", other)
    run.policyctl("list", "remove", LIST)
    wait_until(lambda: exim_ask(run.exim_socket, exim_line(LIST, MEMBER)) ==
               b"REJECT 550 5.1.1 No such list: test@lists.example.com",
               REFRESH * 20 + 5, "the removed list to be unknown")
    # The last list gone: a store without lists is trouble, not permission (fail closed).
    run.policyctl("list", "remove", other)
    wait_until(lambda: exim_ask(run.exim_socket, exim_line(LIST, MEMBER))
               .startswith(b"DEFER 451 4.3.0"),
               REFRESH * 20 + 5, "an empty store to answer the temporary failure")
    assert daemon.proc.pid == pid and daemon.proc.poll() is None


def test_unchanged_store_is_not_reloaded(run, daemons):
    """Every interval the change token is read; the snapshot is rebuilt only on change."""
    run.write_config()
    run.fill()
    daemon = daemons(run)
    first = daemon.wait_ready()["store"]
    later = wait_until(lambda: (lambda s: s if s["checks"] >= first["checks"] + 3 else None)(
        daemon.status()["store"]), REFRESH * 30 + 5, "three more token checks")
    assert later["loads"] == first["loads"]


def test_no_store_yet_means_temporary_failure_then_recovery(run, daemons):
    """Started before the store exists: every query is a 4xx with a clear reason; the
    store appearing is noticed without a restart."""
    run.write_config()
    daemon = daemons(run)
    status = daemon.wait_ready(snapshot=False)
    assert status["snapshot"] is None
    wait_until(lambda: daemon.status()["store"]["last_error"], 5, "the store error")
    assert "policyctl init" in daemon.status()["unavailable_reason"]
    assert exim_ask(run.exim_socket, exim_line(LIST, MEMBER)) == TEMPFAIL
    client = PostfixClient(run.postfix_socket)
    assert client.ask(LIST, "") == (b"action=451 4.3.0 List policy service temporarily "
                                    b"unavailable, please try again later")
    done = run.policyctl("query", LIST, MEMBER, check=False)
    assert done.returncode != 0 and "no snapshot loaded yet" in done.stderr

    run.fill()
    wait_until(lambda: exim_ask(run.exim_socket, exim_line(LIST, MEMBER)) == ACCEPT,
               REFRESH * 20 + 5, "the store to be picked up")
    assert client.ask(LIST, "").startswith(b"action=550 5.7.1")
    client.close()
    # An info line, once the store has gone quiet_interval (30 refreshes) without a
    # failure; written with the next second's flush (a warning goes at once).
    wait_until(lambda: "store recovered" in daemon.text(), REFRESH * 30 + 5,
               "the 'store recovered' line")
    assert daemon.text().count("store refresh failed") == 1


def test_sighup_and_policyctl_reload(run, daemons):
    run.write_config(log_file=True)
    run.fill()
    daemon = daemons(run)
    loads = daemon.wait_ready()["store"]["loads"]
    done = run.policyctl("reload")
    assert "reloaded: on" in done.stdout
    assert daemon.status()["store"]["loads"] == loads + 1
    os.rename(run.path / "policyd.log", run.path / "policyd.log.1")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: daemon.status()["store"]["loads"] == loads + 2, 10, "the SIGHUP reload")
    wait_until(lambda: (run.path / "policyd.log").exists()
               and "snapshot" in (run.path / "policyd.log").read_text(), 5,
               "the log file to be reopened after SIGHUP")
    assert "SIGHUP: reloading" in (run.path / "policyd.log.1").read_text()
    assert daemon.proc.poll() is None


def refused(address) -> bool:
    try:
        socket.create_connection(address, timeout=2).close()
    except OSError:
        return True
    return False


def test_sigterm_closes_listeners_and_lets_requests_in_flight_finish(run, daemons):
    run.write_config()
    run.fill()
    daemon = daemons(run)
    daemon.wait_ready()
    idle = PostfixClient(run.postfix_socket)
    assert idle.ask(LIST, MEMBER) == b"action=DUNNO"
    busy = socket.socket(socket.AF_UNIX)
    busy.settimeout(10)
    busy.connect(str(run.exim_socket))
    line = exim_line(LIST, NONMEMBER)
    busy.sendall(line[:15])
    # accepted by the daemon (not just queued in the kernel's backlog)?
    wait_until(lambda: sum(l["connections"] for l in daemon.status()["listeners"]
                           if l["kind"] == "exim") == 1, 10, "the Exim connection")

    daemon.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "policyd stopping" in daemon.text() or not run.exim_socket.exists(),
               10, "the daemon to start stopping")
    wait_until(lambda: not run.exim_socket.exists(), 10, "the Exim listener to close")
    with pytest.raises(OSError):
        exim_ask(run.exim_socket, line)
    # Each port closes on its own turn of the reactor, so the TCP one may lag the Unix one.
    wait_until(lambda: refused(("127.0.0.1", run.exim_port)), 10,
               "the Exim TCP listener to close")
    assert idle.sock.recv(100) == b""  # the idle Postfix connection was closed
    assert daemon.proc.poll() is None  # still waiting for the request in flight

    busy.sendall(line[15:])
    busy.shutdown(socket.SHUT_WR)
    assert busy.recv(1000) == REJECT
    busy.close()
    assert daemon.wait_exit(10) == 0
    text = daemon.text()
    assert "policyd stopped" in text
    assert not run.control.exists() and not run.postfix_socket.exists()


def test_failed_bind_exits_nonzero_naming_the_key(run):
    run.write_config()
    run.fill()
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", run.postfix_port))
    blocker.listen(1)
    try:
        done = subprocess.run([str(BIN / "policyd"), "--config", str(run.config)],
                              capture_output=True, text=True, timeout=30)
    finally:
        blocker.close()
    assert done.returncode == 1
    assert f"[postfix] listen = tcp:{run.postfix_port}:interface=127.0.0.1" in done.stderr
    assert "Address already in use" in done.stderr
    assert not run.exim_socket.exists()  # what did bind was closed again


def test_unusable_listener_and_bad_config_exit_2(run):
    run.write_config(postfix_listen="tcp:notaport")
    done = subprocess.run([str(BIN / "policyd"), "--config", str(run.config)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "[postfix] listen = tcp:notaport" in done.stderr and "allowed" in done.stderr
    run.write_config(extra="idle_timeout = 100\n")
    done = subprocess.run([str(BIN / "policyd"), "--config", str(run.config)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "[postfix] idle_timeout" in done.stderr and str(run.config) in done.stderr


def test_second_daemon_on_the_same_sockets_is_refused(run, daemons):
    run.write_config()
    run.fill()
    daemons(run).wait_ready()
    done = subprocess.run([str(BIN / "policyd"), "--config", str(run.config)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "listen" in done.stderr or "control_socket" in done.stderr
    assert exim_ask(run.exim_socket, exim_line(LIST, MEMBER)) == ACCEPT  # first unharmed


def test_twist_plugin(run, daemons):
    """``twist policyd --config PATH`` runs the same service."""
    run.write_config()
    run.fill()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    daemon = daemons(run, command=[str(BIN / "twist"), "policyd", "--config", str(run.config)],
                     env=env)
    daemon.wait_ready()
    assert exim_ask(run.exim_socket, exim_line(LIST, NONMEMBER)) == REJECT
    # twist's own reactor gets the monotonic clock too (``makeService``).
    assert "timers on the wall clock" not in daemon.text()
    # twist re-raises the signal it stopped on, so the status is "killed by SIGTERM"
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(20) == -signal.SIGTERM
    assert "policyd stopped" in daemon.text()
    assert not run.exim_socket.exists()


@pytest.mark.parametrize("daemons", ["policyd"], indirect=True)
def test_policyctl_query_previews_the_exim_moderation_step(run, daemons):
    """Through the real daemon and ``policyctl query --from --client --message-id``: the
    ``exim`` line is what the DATA ACL's question about that post gets (a ticket's 451
    on a ``moderate`` list; it showed the hold's ACCEPT), and the query begins nothing:
    the post's first real attempt still draws the ticket, the retry is told it again."""
    import base64
    import json
    import re

    moderated = "moderated@lists.example.com"
    message_id = "<preview-1@example.net>"
    run.write_config(extra="[moderation]\nsync_interval = 0.5\n")
    run.policyctl("init")
    run.policyctl("list", "add", moderated, "--default-nonmember-action", "hold")
    run.policyctl("list", "set", moderated, "--smtp-moderation", "moderate")
    daemon = daemons(run)
    daemon.wait_ready()

    def query(*extra: str) -> str:
        return run.policyctl("query", moderated, NONMEMBER, "--from",
                             f"Bob <{NONMEMBER}>", "--client", "192.0.2.10", *extra).stdout

    def preview() -> dict:
        return json.loads(query("--message-id", message_id, "--json"))

    wait_until(lambda: (preview().get("moderation") or {}).get("usable"), 30,
               "the daemon's moderation state to load", interval=0.2)
    first = preview()
    assert first["exim"] == "DEFER 451 4.7.1 Held for moderator approval, ticket (a new one)"
    assert (first["moderation"]["exim"]["transition"],
            first["moderation"]["exim"]["message_id"]) == ("first-attempt", message_id)

    headers = base64.b64encode(f"From: Bob <{NONMEMBER}>\nSubject: hi\n"
                               f"Message-ID: {message_id}\n".encode()).decode()
    question = (f"POLICYD/1 list={moderated} "
                f"sender={base64.b64encode(NONMEMBER.encode()).decode()} "
                f"headers={headers} client=192.0.2.10 id=1").encode()
    answer = exim_ask(run.exim_socket, question)
    ticket = re.fullmatch(rb"DEFER 451 4\.7\.1 Held for moderator approval, ticket "
                          rb"([A-Z0-9]{6})", answer)
    assert ticket, answer
    waiting = preview()
    assert waiting["exim"].encode() == answer
    assert waiting["moderation"]["exim"]["transition"] == "waiting"
    assert exim_ask(run.exim_socket, question) == answer  # the retry: the same ticket
    assert f"exim:     {answer.decode()}  (moderate: waiting; this query changed " \
        "nothing)" in query("--message-id", message_id)
    # Another post (no Message-ID given): a ticket of its own, the note says so.
    assert "no Message-ID given" in query()
