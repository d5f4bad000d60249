"""The real ``policyd`` process with ``dmarc-mitigation``: ``[dmarc] nameservers`` points
at the test's authoritative DNS server (tests/mailman/dns_server.py) on 127.0.0.1, a list
set with ``policyctl list set --dmarc-mitigate-action reject``, and Exim DATA requests
answered after the lookup: rejected From: a p=reject domain, accepted from p=none, a DNS
failure answered 4xx and logged once."""

from __future__ import annotations

import base64

import pytest

from tests.mailman.dns_process import serving

from .conftest import LIST, exim_ask, wait_until

pytestmark = pytest.mark.integration

ZONE = {"records": {"_dmarc.reject.test": [["TXT", "v=DMARC1; p=reject"]],
                    "_dmarc.none.test": [["TXT", "v=DMARC1; p=none"]]},
        "servfail": ["_dmarc.broken.test", "_dmarc.broken2.test"]}


@pytest.fixture
def dns_port():
    with serving(ZONE) as port:
        yield port


def data_request(frm: str) -> bytes:
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()
    headers = f"From: {frm}\nTo: {LIST}\nSubject: hi\n".encode()
    return (f"POLICYD/1 list={LIST} sender={b64(b'bounce@env.example')} "
            f"headers={b64(headers)} body={b64(b'hello')} size=100\n").encode()


def test_dmarc_reject_through_the_daemon(run, daemons, dns_port):
    """Rejected From: p=reject (after a real lookup), accepted From: p=none and from a
    domain without a record; a SERVFAIL gets the temporary failure (Mailman would
    mitigate: policyd's doubt is never a 5xx) and the failing resolver is logged once for
    two failures."""
    psl = run.path / "psl.dat"
    psl.write_text("test\n")
    run.write_config(extra=f"[dmarc]\nnameservers = 127.0.0.1:{dns_port}\n"
                           f"public_suffix_list = {psl}\ntimeout = 2\n", log_file=True)
    run.policyctl("init")
    run.policyctl("list", "add", LIST, "--default-nonmember-action", "accept")
    run.policyctl("list", "set", LIST, "--dmarc-mitigate-action", "reject")
    daemon = daemons(run)
    daemon.wait_ready()
    ask = lambda frm: exim_ask(run.exim_socket, data_request(frm))  # noqa: E731
    assert ask("Alice <alice@reject.test>").startswith(b"REJECT 550")
    assert ask("bob@reject.test").startswith(b"REJECT 550")     # from the cache
    assert ask("alice@none.test").startswith(b"ACCEPT")
    assert ask("alice@norecord.test").startswith(b"ACCEPT")
    assert ask("alice@broken.test").startswith(b"DEFER 451")
    assert ask("alice@broken2.test").startswith(b"DEFER 451")
    log = wait_until(lambda: (run.path / "policyd.log").read_text()
                     if "DMARC lookup of" in (run.path / "policyd.log").read_text()
                     else None, 10, "the DMARC failure in the log")
    assert log.count("DMARC lookup of") == 1
    explained = run.policyctl("query", LIST, "bounce@env.example", "--from",
                              "alice@reject.test", "--explain").stdout
    assert "dmarc-mitigation" in explained
