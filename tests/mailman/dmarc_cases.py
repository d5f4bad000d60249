"""Agreement cases of ``dmarc-mitigation``: lists with each DMARC mitigation, messages
From: domains whose DMARC records the test's DNS server (tests/mailman/dns_server.py)
serves, and the public suffix list both sides read.

Plain JSON-able data, stdlib only (the oracle reads it inside Mailman's virtualenv).
"""

from __future__ import annotations

from tests.mailman.message_cases import message

HOST = "lists.example.com"

# What both Mailman (parse_suffix_list) and policyd (PublicSuffixList) read: a "test"
# top-level domain, and the wildcard and exception rules of .ck as the real list has.
PUBLIC_SUFFIXES = """\
// The agreement suite's public suffix list.
test
co.test
*.ck
!www.ck
"""

REJECT = "v=DMARC1; p=reject; rua=mailto:dmarc@reject.test"

ZONE = {
    "records": {
        "_dmarc.reject.test": [["TXT", REJECT]],
        "_dmarc.quarantine.test": [["TXT", "v=DMARC1; p=quarantine"]],
        "_dmarc.none.test": [["TXT", "v=DMARC1; p=none"]],
        # the organizational domain's sp= (then p=) for a subdomain without a record
        "_dmarc.orgsp.test": [["TXT", "v=DMARC1; p=none; sp=reject"]],
        "_dmarc.orgp.test": [["TXT", "v=DMARC1; p=quarantine"]],
        "_dmarc.orgspnone.test": [["TXT", "v=DMARC1; p=reject; sp=none"]],
        # a subdomain's own record wins: no fallback
        "_dmarc.sub.subown.test": [["TXT", "v=DMARC1; p=none"]],
        "_dmarc.subown.test": [["TXT", "v=DMARC1; p=reject"]],
        # not a DMARC record: keep looking
        "_dmarc.spf.test": [["TXT", "v=spf1 -all"]],
        "_dmarc.badsyntax.test": [["TXT", "v=DMARC1 p=reject"]],
        "_dmarc.sub.fallthrough.test": [["TXT", "v=spf1 -all"]],
        "_dmarc.fallthrough.test": [["TXT", "v=DMARC1; p=reject"]],
        # only the first record of the RRset is read
        "_dmarc.first.test": [["TXT", "v=spf1 -all"], ["TXT", "v=DMARC1; p=reject"]],
        "_dmarc.second.test": [["TXT", "v=DMARC1; p=reject"], ["TXT", "v=spf1 -all"]],
        "_dmarc.upper.test": [["TXT", "v=DMARC1; P=REJECT"]],
        "_dmarc.nop.test": [["TXT", "v=DMARC1; rua=mailto:x@nop.test"]],
        "_dmarc.word.test": [["TXT", "v=DMARC1; p=rejected"]],
        # through a CNAME
        "_dmarc.cname.test": [["CNAME", "policy.reject.test"]],
        "policy.reject.test": [["TXT", REJECT]],
        "_dmarc.cnamenone.test": [["CNAME", "policy.none.test"]],
        # Mailman compares the CNAME target as sent with lower-cased owner names
        "_dmarc.cnameupper.test": [["CNAME", "Policy.Reject.test"]],
        "policy.none.test": [["TXT", "v=DMARC1; p=none"]],
        # a name with no TXT (NOERROR, no answer): keep looking
        "_dmarc.empty.test": [["CNAME", "nowhere.test"]],
        # a CNAME target with bytes that are not ASCII (0xff 0xfe): dnspython writes it
        # \255\254 and follows it; Twisted's str() of it raised (found by a probe)
        "_dmarc.badcname.test": [["CNAME", "\u00ff\u00fe.evil.test"]],
        "_dmarc.badcnamerej.test": [["CNAME", "\u00ff\u00fe.rej.test"]],
        "\u00ff\u00fe.rej.test": [["TXT", REJECT]],
        "_dmarc.www.ck": [["TXT", REJECT]],
        "_dmarc.co.test": [["TXT", REJECT]],
    },
    "servfail": ["_dmarc.servfail.test", "_dmarc.servfailorg.test"],
    "refused": ["_dmarc.refused.test"],
}

# (From: header, what Mailman decides for a list that rejects: True mitigated)
FROMS = [
    ("Alice <alice@reject.test>", True),
    ("alice@quarantine.test", True),
    ("alice@none.test", False),
    ("alice@norecord.test", False),
    ("alice@sub.orgsp.test", True),
    ("alice@orgsp.test", False),
    ("alice@a.b.orgp.test", True),
    ("alice@a.b.orgspnone.test", False),
    ("alice@orgspnone.test", True),
    ("alice@sub.subown.test", False),
    ("alice@spf.test", False),
    ("alice@badsyntax.test", False),
    ("alice@sub.fallthrough.test", True),
    ("alice@first.test", False),
    ("alice@second.test", True),
    ("alice@upper.test", True),
    ("alice@nop.test", False),
    ("alice@word.test", False),
    ("alice@cname.test", True),
    ("alice@cnamenone.test", False),
    ("alice@cnameupper.test", False),
    ("alice@empty.test", False),
    ("alice@badcname.test", False),
    ("alice@badcnamerej.test", True),
    ("alice@servfail.test", True),
    ("alice@sub.servfailorg.test", True),
    ("alice@refused.test", True),
    ("alice@a.www.ck", True),
    ("alice@a.foo.ck", False),
    ("alice@x.co.test", False),
    ("ALICE@Reject.TEST", True),
    ("listed@none.test", False),
    ("boss@norecord.test", False),
    ("undisclosed-recipients:;", False),
    ("no-at-sign", False),
    # parseaddr (strict): one address or none
    ("<alice@reject.test> garbage", False),
    ("alice@reject.test, bob@none.test", False),
    ("Alice (the boss) <alice@reject.test>", True),
    ('"bob@none.test" <alice@reject.test>', True),
    ("(unbalanced alice@reject.test", False),
    # Bytes that are not ASCII: Mailman's str(Header) has U+FFFD for each; a domain
    # with them is no DNS name (dnspython's IDNAException is a DNSException: mitigate).
    ("\u00c5lice <alice@reject.test>", True),
    ("\u00c5lice <alice@none.test>", False),
    ("alice@r\u00e9ject.test", True),
]

LISTS = [
    ("dm-reject", {"dmarc_mitigate_action": "reject"}),
    ("dm-discard", {"dmarc_mitigate_action": "discard"}),
    ("dm-munge", {"dmarc_mitigate_action": "munge_from"}),
    ("dm-wrap", {"dmarc_mitigate_action": "wrap_message"}),
    ("dm-off", {"dmarc_mitigate_action": "no_mitigation"}),
    ("dm-reject-uncond", {"dmarc_mitigate_action": "reject",
                          "dmarc_mitigate_unconditionally": True}),
    ("dm-munge-uncond", {"dmarc_mitigate_action": "munge_from",
                         "dmarc_mitigate_unconditionally": True}),
    ("dm-listed", {"dmarc_mitigate_action": "discard",
                   "dmarc_addresses": ["listed@none.test", "^boss@"]}),
]


def dmarc_lists() -> list[dict]:
    return [{"fqdn": f"{name}@{HOST}", "default_member_action": "defer",
             "default_nonmember_action": "accept", "content": dict(content)}
            for name, content in LISTS]


def dmarc_cases() -> list[dict]:
    cases = []
    for name, _ in LISTS:
        address = f"{name}@{HOST}"
        for index, (frm, _) in enumerate(FROMS):
            headers = [("From", frm), ("To", address), ("Subject", "A post"),
                       ("Message-ID", f"<dmarc-{index}@agreement.invalid>"),
                       ("Date", "Mon, 01 Jan 2024 00:00:00 +0000")]
            cases.append({"id": f"dmarc-{name}-{index}", "rule": "dmarc-mitigation",
                          "recipient": address, "envelope_sender": "bounce@env.invalid",
                          "raw": message(headers), "why": f"From: {frm}"})
        # Only the first From: header counts (msg.get('from')).
        headers = [("From", "alice@none.test"), ("From", "alice@reject.test"),
                   ("To", address), ("Subject", "Two From headers"),
                   ("Message-ID", "<dmarc-two@agreement.invalid>")]
        cases.append({"id": f"dmarc-{name}-two-from", "rule": "dmarc-mitigation",
                      "recipient": address, "envelope_sender": "bounce@env.invalid",
                      "raw": message(headers), "why": "first From: only"})
    return cases


# The From: domains whose lookups fail (SERVFAIL, REFUSED): Mailman mitigates, policyd
# answers the temporary failure (an intended difference, docs/mailman-differences.md).
FAILING_DOMAINS = ("servfail.test", "sub.servfailorg.test", "refused.test")


def dns_failure(case_id: str) -> bool:
    """The case's From: domain is one whose DMARC lookup fails."""
    if case_id.endswith("-two-from"):
        return False
    _, _, index = case_id[len("dmarc-"):].rpartition("-")
    frm = FROMS[int(index)][0]
    return frm.rpartition("@")[2].lower() in FAILING_DOMAINS


def expected(case_id: str) -> str:
    """What Mailman's chain is expected to decide (a check on the oracle itself)."""
    if case_id.endswith("-two-from"):
        return "accept"
    name, _, index = case_id[len("dmarc-"):].rpartition("-")
    settings = dict(LISTS)[name]
    action = settings["dmarc_mitigate_action"]
    frm, mitigated = FROMS[int(index)]
    listed = settings.get("dmarc_addresses", ())
    if frm in listed or (frm.startswith("boss@") and "^boss@" in listed):
        mitigated = True
    if mitigated and action in ("reject", "discard"):
        return action
    return "accept"


def scenario(dns_port: int, suffixes_path: str) -> dict:
    return {"domains": [{"mail_host": HOST}], "lists": dmarc_lists(),
            "cases": dmarc_cases(), "dns": {"host": "127.0.0.1", "port": dns_port},
            "public_suffix_list": suffixes_path}
