"""Who owns the other end of a loopback TCP connection: its uid, from the kernel.

A TCP listener on 127.0.0.1 (``inet:127.0.0.1:...`` in Postfix's ``check_policy_service``)
sees every local process as the same address, so at a limit the per-peer share
(``TrackingFactory``) could not tell the MTA from a local process crowding it out.  The
kernel knows the owner of every socket (``ss -e`` shows it): one ``sock_diag`` request
over netlink for the peer's socket (its address and port as the source, the listener's
as the destination) answers with its uid, as ``SO_PEERCRED`` does for a Unix socket.  So
a loopback client counts as its address and its uid (``127.0.0.1 uid 107``): a local
process of another user is not the MTA, even from the MTA's address.

Asked only at a limit, once per connection (``peer_of``).  The request is answered by
the kernel before ``sendto`` returns, and read without waiting: no answer (another kernel,
a sandbox without netlink, the peer already gone) is ``None``, and the connection then
counts by its address, as before.
"""

from __future__ import annotations

import socket
import struct

__all__ = ["AVAILABLE", "is_loopback", "owner"]

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLMSG_HEADER = struct.Struct("=IHHII")       # len, type, flags, seq, pid
_NLM_F_REQUEST = 1
# inet_diag_req_v2: family, protocol, ext, pad, states; then inet_diag_sockid.
_REQUEST = struct.Struct("=BBBBI")
# inet_diag_msg after its 4 bytes of family/state/timer/retrans and the 48-byte sockid:
# expires, rqueue, wqueue, uid, inode.
_MESSAGE_TAIL = struct.Struct("=IIIII")
_SOCKID_AT = _NLMSG_HEADER.size + 4
_TAIL_AT = _SOCKID_AT + 48
_ANY_COOKIE = struct.pack("=II", 0xFFFFFFFF, 0xFFFFFFFF)

AVAILABLE = hasattr(socket, "AF_NETLINK")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ``::1`` or an IPv4-mapped loopback address."""
    if host.startswith("127.") or host == "::1":
        return True
    if host.startswith("::ffff:"):
        return host[7:].startswith("127.")
    return False


def _packed(host: str, family: int) -> bytes:
    raw = socket.inet_pton(family, host)
    return raw + bytes(16 - len(raw))


def owner(local: tuple[str, int], peer: tuple[str, int]) -> int | None:
    """The uid owning the socket at ``peer`` connected to ``local`` (both ``(host,
    port)`` of a loopback TCP connection, as the listener sees it), ``None`` when the
    kernel does not say."""
    if not AVAILABLE:
        return None
    try:
        # An IPv4 client of a dual-stack listener (``::ffff:127.0.0.1``) is asked about
        # as AF_INET6 with the mapped address: the kernel finds it so.
        family = socket.AF_INET6 if ":" in peer[0] else socket.AF_INET
        sockid = (struct.pack("!HH", peer[1], local[1]) + _packed(peer[0], family)
                  + _packed(local[0], family) + struct.pack("=I", 0) + _ANY_COOKIE)
        body = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
        header = _NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(body), _SOCK_DIAG_BY_FAMILY,
                                    _NLM_F_REQUEST, 1, 0)
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM,
                           _NETLINK_SOCK_DIAG) as query:
            query.sendto(header + body, (0, 0))
            data = query.recv(4096, socket.MSG_DONTWAIT)
        if len(data) < _TAIL_AT + _MESSAGE_TAIL.size:
            return None
        kind = _NLMSG_HEADER.unpack_from(data)[1]
        if kind != _SOCK_DIAG_BY_FAMILY:
            return None  # NLMSG_ERROR: no such socket (gone), or not allowed
        # The answer is about the socket asked for: its ports as asked.
        if data[_SOCKID_AT:_SOCKID_AT + 4] != sockid[:4]:
            return None
        return _MESSAGE_TAIL.unpack_from(data, _TAIL_AT)[3]
    except (OSError, ValueError, struct.error, TypeError, IndexError):
        return None
