"""A blocking client for the daemon's control socket (used by ``policyctl``; no reactor).

Each call opens the Unix socket, sends one JSON line, reads one JSON line, closes.
``ControlError`` means the daemon is not running, not reachable, or answered an error.
"""

from __future__ import annotations

import json
import os
import socket
import time

__all__ = ["ControlError", "query", "status", "reload", "request", "query_message", "encode"]


class ControlError(Exception):
    """The daemon is not running, is unreachable, or answered with an error."""


class DaemonError(ControlError):
    """The daemon answered, with an error (no snapshot to decide on, a failed reload)."""


class AnswerTimeout(ControlError):
    """The daemon took the request and did not answer in time."""


def request(socket_path, message: dict, timeout: float = 5.0) -> dict:
    """Send one request and return its ``result``; raise ``ControlError`` otherwise."""
    path = os.fspath(socket_path)
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise ControlError(f"no control socket at {path}: is policyd running?") from None
        except ConnectionRefusedError:
            raise ControlError(f"nothing listens on {path}: is policyd running?") from None
        except PermissionError:
            raise ControlError(f"permission denied on {path} (see [daemon] "
                               "control_socket_mode)") from None
        except OSError as error:
            raise ControlError(f"cannot connect to {path}: {error.strerror or error}") from None
        try:
            sock.sendall(encode(message))
            chunks = []
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout()
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if chunk.endswith(b"\n") or b"\n" in chunk:
                    break
        except socket.timeout:
            raise AnswerTimeout(f"policyd did not answer within {timeout:g} s on {path}") \
                from None
        except OSError as error:
            raise ControlError(f"talking to policyd on {path} failed: "
                               f"{error.strerror or error}") from None
    finally:
        sock.close()
    data = b"".join(chunks)
    line, newline, _ = data.partition(b"\n")
    if not newline:
        raise ControlError(f"policyd closed {path} without a complete answer")
    try:
        answer = json.loads(line)
    except ValueError:
        raise ControlError(f"policyd sent an unreadable answer on {path}") from None
    if not isinstance(answer, dict) or "ok" not in answer:
        raise ControlError(f"policyd sent an unexpected answer on {path}")
    if not answer["ok"]:
        raise DaemonError(f"policyd: {answer.get('error')}")
    return answer.get("result")


def query(socket_path, recipient: str, envelope_sender: str, from_header: str | None = None,
          reply_to_header: str | None = None, sender_header: str | None = None,
          timeout: float = 5.0, client_address: str | None = None,
          message_id: str | None = None) -> dict:
    message = query_message(recipient, envelope_sender, from_header, reply_to_header,
                            sender_header, client_address, message_id)
    return request(socket_path, message, timeout)


def query_message(recipient: str, envelope_sender: str, from_header: str | None = None,
                  reply_to_header: str | None = None, sender_header: str | None = None,
                  client_address: str | None = None, message_id: str | None = None) -> dict:
    """The ``query`` request as ``query`` sends it."""
    message = {
        "op": "query", "recipient": recipient, "envelope_sender": envelope_sender,
        "from_header": from_header, "reply_to_header": reply_to_header,
        "sender_header": sender_header,
    }
    if client_address:
        message["client_address"] = client_address
    if message_id:
        message["message_id"] = message_id
    return message


def encode(message: dict) -> bytes:
    """A request's line as sent, its newline included."""
    return json.dumps(message).encode("utf-8") + b"\n"


def status(socket_path, timeout: float = 5.0) -> dict:
    return request(socket_path, {"op": "status"}, timeout)


def reload(socket_path, timeout: float = 5.0) -> dict:
    return request(socket_path, {"op": "reload"}, timeout)
