"""What the log promises (docs/configuration.md, Logging) under either launcher: one
event is one line, whatever a client sends, and warnings any client can cause at will
are written a few times a minute per kind."""

from __future__ import annotations

import pytest

from policyd.protocols.postfix import MALFORMED_MAX

from .conftest import LIST, PostfixClient, b64, exim_ask, wait_until

pytestmark = pytest.mark.integration

FLOOD = 200


def test_a_client_can_neither_flood_nor_forge_the_log(run, daemons):
    """A flood of malformed requests writes at most five lines per protocol, then one
    summary; a CR/LF in a sender never starts a line of its own (``twist``'s own
    observer included, which policyd does not write for)."""
    run.write_config()
    run.fill()
    daemon = daemons(run)
    daemon.wait_ready()
    for _ in range(FLOOD):
        assert exim_ask(run.exim_socket, b"BOGUS").startswith(b"DEFER 451 4.3.0 Malformed")
    # A connection is closed at its MALFORMED_MAX-th malformed request: the flood
    # reconnects.
    for _ in range(FLOOD // MALFORMED_MAX):
        client = PostfixClient(run.postfix_socket)
        try:
            for _ in range(MALFORMED_MAX):
                client.send(b"garbage\n\n")
                assert client.read_answer().startswith(b"action=451 4.3.0 Malformed")
        finally:
            client.close()
    forged = "evil\r\n2026-12-07T00:00:00.000 info [policyd] FORGED\rline\x1b[2J@x.example"
    exim_ask(run.exim_socket, f"POLICYD/1 list={LIST} sender={b64(forged)}".encode())

    def written() -> bytes | None:
        raw = daemon.output_path.read_bytes()
        return raw if b"FORGED" in raw else None

    raw = wait_until(written, 10, "the decision line with the forged sender")
    assert b"\r" not in raw and b"\x1b" not in raw
    lines = raw.decode(errors="replace").split("\n")
    assert sum("malformed Exim" in line for line in lines) <= 5
    assert sum("malformed Postfix" in line for line in lines) <= 5
    [line] = [line for line in lines if "FORGED" in line]
    assert "[policyd.decision" in line and "sender=<evil\\r\\n2026" in line
