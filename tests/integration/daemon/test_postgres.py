"""The real daemon on a PostgreSQL store that becomes unreachable and comes back.

The daemon reaches PostgreSQL through a TCP proxy the test controls; ``policyctl`` writes
to PostgreSQL directly.  Cutting the proxy (refusing new connections, cutting the pooled
ones) makes the store unreachable for the daemon only.
"""

from __future__ import annotations

import pytest

from .conftest import (
    LIST,
    MEMBER,
    NONMEMBER,
    PG,
    REFRESH,
    PostfixClient,
    TcpProxy,
    exim_ask,
    exim_line,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

ACCEPT = b"ACCEPT 250 2.1.5 accept"
REJECT = (b"REJECT 550 5.7.1 Posting to test@lists.example.com is restricted to its "
          b"members; your message was not accepted")
TEMPFAIL = b"DEFER 451 4.3.0 List policy service temporarily unavailable, please try again later"


def pg_url(database: str, port: int = PG[1]) -> str:
    return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{database}"


@pytest.fixture
def proxy():
    proxy = TcpProxy(PG)
    yield proxy
    proxy.stop()


def test_store_outage_serves_last_good_then_recovers(run, daemons, pg_database, proxy):
    direct = pg_url(pg_database)
    run.write_config(url=pg_url(pg_database, proxy.port))
    run.fill(store=direct)
    proxy.start()
    daemon = daemons(run)
    status = daemon.wait_ready()
    assert "postgresql" in status["store"]["describe"]
    assert "secret" not in status["store"]["describe"]
    pid = daemon.proc.pid
    assert exim_ask(run.exim_socket, exim_line(LIST, MEMBER)) == ACCEPT
    assert exim_ask(run.exim_socket, exim_line(LIST, NONMEMBER)) == REJECT
    postfix = PostfixClient(run.postfix_socket)
    assert postfix.ask(LIST, "").startswith(b"action=550 5.7.1")

    # --- the store goes away: the last good snapshot keeps serving -----------------
    proxy.stop()
    wait_until(lambda: daemon.status()["store"]["healthy"] is False, REFRESH * 20 + 10,
               "the daemon to notice the store is unreachable")
    run.policyctl("member", "add", LIST, NONMEMBER, store=direct)  # it cannot see this
    failed = daemon.status()["store"]["failed_refreshes"]
    wait_until(lambda: daemon.status()["store"]["failed_refreshes"] >= failed + 3,
               REFRESH * 40 + 10, "more failed refreshes")
    assert exim_ask(run.exim_socket, exim_line(LIST, MEMBER)) == ACCEPT
    assert exim_ask(run.exim_socket, exim_line(LIST, NONMEMBER)) == REJECT
    assert postfix.ask(LIST, "").startswith(b"action=550 5.7.1")
    status = daemon.status()
    assert status["snapshot"] is not None and status["store"]["last_error"]
    done = run.policyctl("status")
    assert "healthy: off" in done.stdout and "last_error" in done.stdout
    done = run.policyctl("query", LIST, MEMBER)
    assert "ACCEPT 250 2.1.5 accept" in done.stdout

    # --- the store is back: the change made meanwhile shows up ------------------------
    proxy.start()
    wait_until(lambda: exim_ask(run.exim_socket, exim_line(LIST, NONMEMBER)) == ACCEPT,
               REFRESH * 20 + 15, "the change made during the outage")
    # Healthy once the store has gone quiet_interval (30 refreshes) without a failure.
    wait_until(lambda: daemon.status()["store"]["healthy"], REFRESH * 30 + 10,
               "a healthy store")
    assert daemon.status()["store"]["last_error"]  # kept for the admin, with its age
    postfix.close()
    assert daemon.proc.pid == pid and daemon.proc.poll() is None
    text = wait_until(lambda: (lambda t: t if "store recovered" in t else None)(daemon.text()),
                      5, "the recovery line")
    assert text.count("store refresh failed") == 1, text  # once per incident
    assert text.count("store recovered") == 1

    # --- a second incident is logged again -------------------------------------------
    proxy.stop()
    wait_until(lambda: daemon.status()["store"]["healthy"] is False, REFRESH * 20 + 10,
               "the second outage")
    wait_until(lambda: daemon.text().count("store refresh failed") == 2, 5,
               "the second incident's log line")
    assert exim_ask(run.exim_socket, exim_line(LIST, NONMEMBER)) == ACCEPT
    assert daemon.terminate() == 0


def test_unreachable_at_start_is_a_temporary_failure_until_it_answers(run, daemons,
                                                                      pg_database, proxy):
    direct = pg_url(pg_database)
    run.write_config(url=pg_url(pg_database, proxy.port))
    run.fill(store=direct)
    daemon = daemons(run)  # the proxy is not started: the store is unreachable
    daemon.wait_ready(snapshot=False)
    wait_until(lambda: daemon.status()["store"]["last_error"], REFRESH * 20 + 10,
               "the first failed refresh")
    assert exim_ask(run.exim_socket, exim_line(LIST, MEMBER)) == TEMPFAIL
    done = run.policyctl("query", LIST, MEMBER, check=False)
    assert done.returncode != 0 and "no snapshot loaded yet" in done.stderr
    proxy.start()
    wait_until(lambda: exim_ask(run.exim_socket, exim_line(LIST, MEMBER)) == ACCEPT,
               REFRESH * 20 + 15, "the first snapshot")
    assert daemon.terminate() == 0
