"""twistd/twist plugin: ``twist policyd --config /etc/policyd/policyd.conf``."""

from twisted.application.service import ServiceMaker

policyd = ServiceMaker(
    "policyd",
    "policyd.tap",
    "SMTP-time mailing-list posting policy for Postfix and Exim (Mailman semantics)",
    "policyd",
)
