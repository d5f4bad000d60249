"""The wire protocols: one module each, a pure codec plus a thin Twisted protocol.

``postfix``  the Postfix policy delegation protocol (SMTPD_POLICY_README), persistent.
``exim``     one line per connection for Exim's ``${readsocket}``, answered without newline.
``control``  JSON lines over a Unix socket for ``policyctl`` (query, status, reload).
"""

from __future__ import annotations


class ProtocolError(Exception):
    """The peer sent something we cannot read.  It is the peer's fault: answer with a
    temporary failure and say why, never a 5xx.

    ``fatal`` means the framing can no longer be trusted (an over-long line or request):
    answer, then close the connection.
    """

    def __init__(self, reason: str, *, fatal: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fatal = fatal
