"""List content settings as the native store writes and reads them."""

from __future__ import annotations

import pytest

from policyd.store.queries import BadInput, _content_value, content_spec


def test_acceptable_aliases_are_stored_and_read_as_mailman_stores_them():
    """Mailman's AcceptableAliasSet.add lower-cases each alias (a regex's \\S becomes \\s
    there too) and refuses one that is neither a regex nor an address; policyd kept them
    as written, so a mixed-case alias matched in policyd and not in Mailman, or the
    other way round."""
    stored = _content_value("acceptable_aliases", ["Team@Example.ORG", "^\\S+@x\\.org"])
    assert stored == "team@example.org\n^\\s+@x\\.org"
    # A row written before: read as Mailman would have stored it.
    spec = content_spec({"acceptable_aliases": "Team@Example.ORG\n^\\S+@x\\.org"})
    assert spec["acceptable_aliases"] == ("team@example.org", "^\\s+@x\\.org")
    with pytest.raises(BadInput, match="neither a regular expression"):
        _content_value("acceptable_aliases", ["just-a-word"])
