"""The Mailman 3 backend reads rules/dmarc.py's settings (dmarc_mitigate_action, its
unconditionally flag, dmarc_addresses) from a database Mailman wrote, and a change of
each is seen by the change token and the next snapshot."""

from __future__ import annotations

import pytest

from policyd.core.dmarc import DmarcAction
from policyd.store.mailman3 import Mailman3Backend

LIST = "dm@example.com"


@pytest.fixture
def sqlite_db(request, mailman_python, tmp_path):
    from tests.mailman3_backend.conftest import MailmanBuilder

    var_dir = tmp_path / "var"
    var_dir.mkdir()
    return MailmanBuilder(mailman_python, f"sqlite:///{tmp_path / 'mailman.db'}", var_dir)


def test_dmarc_settings_read_and_followed(sqlite_db):
    """New list: no_mitigation, off, no addresses (Mailman's style); each setting made
    through Mailman's API reaches the snapshot, and changes the token."""
    sqlite_db.apply({"op": "domain", "mail_host": "example.com"},
                    {"op": "list", "fqdn": LIST})
    backend = Mailman3Backend(sqlite_db.url)
    try:
        content = backend.load_snapshot().lists[LIST].content
        assert (content.dmarc_mitigate_action, content.dmarc_mitigate_unconditionally,
                content.dmarc_addresses) == (DmarcAction.NO_MITIGATION, False, ())
        token = backend.change_token()
        sqlite_db.apply({"op": "set", "list": LIST, "settings": {
            "dmarc_mitigate_action": "reject", "dmarc_mitigate_unconditionally": True,
            "dmarc_addresses": ["a@b.example", "^x.*@y\\.example"]}})
        assert backend.change_token() != token
        content = backend.load_snapshot().lists[LIST].content
        assert content.dmarc_mitigate_action == DmarcAction.REJECT
        assert content.dmarc_mitigate_unconditionally is True
        assert content.dmarc_addresses == ("a@b.example", "^x.*@y\\.example")
        token = backend.change_token()
        sqlite_db.apply({"op": "set", "list": LIST, "settings": {
            "dmarc_mitigate_action": "discard"}})
        assert backend.change_token() != token
        assert backend.load_snapshot().lists[LIST].content.dmarc_mitigate_action == \
            DmarcAction.DISCARD
    finally:
        backend.close()


def test_dmarc_addresses_alone(sqlite_db):
    """A change of dmarc_addresses alone changes the token and reaches the next
    snapshot."""
    sqlite_db.apply({"op": "domain", "mail_host": "example.com"},
                    {"op": "list", "fqdn": LIST})
    backend = Mailman3Backend(sqlite_db.url)
    try:
        backend.load_snapshot()
        token = backend.change_token()
        sqlite_db.apply({"op": "set", "list": LIST, "settings": {
            "dmarc_addresses": ["only@b.example"]}})
        assert backend.change_token() != token
        assert backend.load_snapshot().lists[LIST].content.dmarc_addresses == (
            "only@b.example",)
    finally:
        backend.close()
