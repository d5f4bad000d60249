"""twistd/twist plugin: ``twist policyd --config /etc/policyd/policyd.conf``."""

from twisted.application.service import ServiceMaker

policyd = ServiceMaker(
    "policyd",
    "policyd.tap",
    "SMTP-time mailing-list posting policy for Postfix and Exim (Mailman semantics)",
    "policyd",
)

# ``twist --reactor=policyd policyd ...``: the reactor the ``policyd`` command runs
# (``policyd.runtime.reactor``; Twisted's stock one when its start-up check fails).
from twisted.application.reactors import Reactor  # noqa: E402

policyd_reactor = Reactor(
    "policyd", "policyd.runtime.reactor",
    "epoll without the per-event legacy log context (policyd's own, checked at start-up)")
