"""Site ``[antispam] header_checks`` and ``jump_chain``: policyd against the real
Mailman 3.3.10 given the same ``mailman.cfg`` text.

For each site configuration the oracle's Mailman is started with the ``[antispam]``
section appended to its own configuration file; policyd reads the same text from a file
with ``policyd.mailman_site.load`` (what ``[mailman] config_file`` does) and decides the
same whole messages, sent as the Exim DATA ACL sends them.  Every case must get Mailman's
verdict from the rule Mailman's chain hit (0 disagreements).
"""

from __future__ import annotations

import pytest

from policyd import mailman_site
from tests.mailman.harness import decide_all, run_oracle, snapshot, table
from tests.mailman.message_cases import _case, _multipart, _std, message
from tests.reporting import report

pytestmark = [pytest.mark.mailman, pytest.mark.integration]

HOST = "lists.example.com"
PASSWORD = "s3cret-Pw"
MEMBER = "pat@example.com"
OPEN = f"open@{HOST}"          # nonmembers accepted: a site hit is all that can stop them
CLOSED = f"closed@{HOST}"      # nonmembers rejected, with list header_matches
ANNOUNCE = f"announce@{HOST}"  # moderator password
URGENT = f"urgent@{HOST}"      # emergency on

CHECKS = """\
header_checks:
  X-Spam: (yes|maybe)
  Authentication-Results: mail.example.com; dmarc=(fail|quarantine)
  a bogus line without a colon
  X-Bad: [unclosed
  X-Spaced : yes

  X-Trusted:   ^trusted$
"""

#: id -> the [antispam] section the oracle's Mailman and policyd are both given.
SITES = {
    "discard": "[antispam]\n" + CHECKS + "jump_chain: discard\n",
    "accept": "[antispam]\n" + CHECKS + "jump_chain: accept\n",
    "default": "[antispam]\n" + CHECKS,  # jump_chain: hold, Mailman's default
    "reject-no-checks": "[antispam]\njump_chain: reject\n",
}


def lists() -> list[dict]:
    return [
        {"fqdn": OPEN, "default_member_action": "defer",
         "default_nonmember_action": "accept", "members": [{"address": MEMBER}]},
        {"fqdn": CLOSED, "default_member_action": "defer",
         "default_nonmember_action": "reject", "members": [{"address": MEMBER}],
         "content": {"header_matches": [
             ["X-Whitelist", "^ok$", "accept"],
             ["X-List", "flag", None],
             ["X-Spam", "yes", "hold"],
         ]}},
        {"fqdn": ANNOUNCE, "default_member_action": "defer",
         "default_nonmember_action": "reject", "members": [{"address": MEMBER}],
         "content": {"moderator_password": PASSWORD}},
        {"fqdn": URGENT, "default_member_action": "accept",
         "default_nonmember_action": "accept", "emergency": True,
         "members": [{"address": MEMBER}]},
    ]


def cases() -> list[dict]:
    mime = [("MIME-Version", "1.0"),
            ("Content-Type", 'multipart/mixed; boundary="BOUNDARY"')]
    out = []
    for cid, listaddr, extra, why in [
        ("yes", OPEN, [("X-Spam", "yes")], "a site line matches"),
        ("case", OPEN, [("x-spam", "MAYBE so")], "field name and value ignore case"),
        ("encoded", OPEN, [("X-Spam", "=?utf-8?q?yes?=")], "RFC 2047-decoded first"),
        ("second-line", OPEN, [("Authentication-Results",
                                "mx.example; mail.example.com; dmarc=fail")],
         "the second line, searched anywhere in the value"),
        ("no", OPEN, [("X-Spam", "no")], "no site line matches"),
        ("bad-regex", OPEN, [("X-Bad", "[unclosed")], "a pattern that does not compile"),
        ("spaced", OPEN, [("X-Spaced", "yes")],
         "the header name keeps the space before the colon: never matches"),
        ("trusted", OPEN, [("X-Trusted", "trusted")], "after a blank line, lstripped"),
        ("trusted-not", OPEN, [("X-Trusted", "untrusted")], "anchored"),
        ("over-list-accept", CLOSED, [("X-Whitelist", "ok"), ("X-Spam", "yes")],
         "site lines before the list's accept entry"),
        ("list-accept", CLOSED, [("X-Whitelist", "ok")], "the list's entry, no site hit"),
        ("list-no-action", CLOSED, [("X-List", "flag")],
         "a list entry without a chain takes jump_chain"),
        ("closed-none", CLOSED, [], "nothing matches: nonmember reject"),
        ("approved", ANNOUNCE, [("Approved", PASSWORD), ("X-Spam", "yes")],
         "approved runs before header-match"),
        ("approved-wrong", ANNOUNCE, [("Approved", "nope"), ("X-Spam", "yes")],
         "a wrong password: the site line decides"),
        ("emergency", URGENT, [("X-Spam", "yes")], "header-match runs before emergency"),
        ("emergency-none", URGENT, [], "emergency holds"),
    ]:
        out.append(_case(f"site-{cid}", "header-match", listaddr,
                         message(_std(listaddr, extra=extra)), why=why))
    out.append(_case("site-member", "header-match", CLOSED,
                     message(_std(CLOSED, sender=MEMBER, extra=[("X-Spam", "maybe")])),
                     sender=MEMBER, why="a member's post too"))
    out.append(_case("site-part", "header-match", OPEN,
                     message(_std(OPEN, extra=mime),
                             _multipart("hi", part_headers=[("Content-Type", "text/html"),
                                                            ("X-Spam", "yes")])),
                     why="a MIME part's header counts"))
    return out


def scenario(site: str) -> dict:
    return {"domains": [{"mail_host": HOST, "alias_domain": None}], "lists": lists(),
            "cases": cases(), "mailman_cfg": SITES[site]}


def _rule(record) -> str:
    hits = record["rule_hits"]
    if not hits:
        return "accept"
    return "header-match" if hits[-1].startswith("header-match") else hits[-1]


@pytest.mark.parametrize("site", sorted(SITES))
def test_site_header_checks_agree_with_mailman(mm_python, tmp_path, capsys, site):
    """Mailman and policyd, given the same [antispam] section, decide every case the
    same and by the same rule."""
    data = scenario(site)
    result = run_oracle(mm_python, data)
    path = tmp_path / "mailman.cfg"
    path.write_text(SITES[site])
    checks, _notes = mailman_site.load(path)
    rows = decide_all(snapshot(result, checks), data["cases"], result)
    wrong = [row for row in rows
             if row.mailman != row.policyd or _rule(row.record) != row.decision.rule]
    site_hits = sum(any(h.startswith("header-match-config-") for h in row.record["rule_hits"])
                    for row in rows)
    with capsys.disabled():
        report(f"[mailman agreement, site header_checks {site}] {len(rows)} cases, "
               f"{site_hits} decided by a site line, {len(wrong)} disagreements")
    assert not wrong, table(wrong)
    assert all(row.record["outcome"] != "error" for row in rows)
    if site != "reject-no-checks":
        assert site_hits >= 8
        # policyd's trace names the site line Mailman's rule name numbers.
        row = next(r for r in rows if r.case["id"] == "msg-site-trusted")
        assert "header-match-config-7" in row.record["rule_hits"]
        assert "site header_checks line 7 (X-Trusted: ^trusted$)" in row.decision.reason
        assert row.decision.reason.endswith("(Mailman's rule header-match-config-7)")
