"""policyd's engine against the real Mailman 3.3.10: same lists, same cases, same verdicts.

The oracle (tests/mailman/oracle.py, run in Mailman's own virtualenv) builds the scenario
of tests/mailman/cases.py through Mailman's API and runs Mailman's posting chain on every
case; policyd decides the same cases from a snapshot built out of what Mailman exported.
Every case must agree, except the intended differences of docs/mailman-differences.md,
which must differ exactly as documented.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest

from tests.reporting import report
from policyd.core.verdict import Action, Verdict
from tests.mailman.cases import intended_differences, scenario
from tests.mailman.harness import (
    REPO,
    decide_all,
    list_specs,
    mailman_verdict,
    run_oracle,
    snapshot,
    table,
)

pytestmark = [pytest.mark.mailman, pytest.mark.integration]

DIFFERENCES_DOC = REPO / "docs" / "mailman-differences.md"


class Agreement:
    def __init__(self, data, result, rows):
        self.data = data
        self.result = result
        self.rows = rows
        self.compared = [row for row in rows if "difference" not in row.case]
        self.intended = [row for row in rows if "difference" in row.case]
        self.disagreements = [row for row in self.compared if row.mailman != row.policyd]

    def summary(self, label):
        return (f"\n[mailman agreement, {label}] {len(self.result.lists)} lists, "
                f"{len(self.rows)} cases: {len(self.compared)} compared, "
                f"{len(self.disagreements)} disagreements, {len(self.intended)} intended "
                f"differences; Mailman {self.result.database['mailman_version']} "
                f"(schema {self.result.database['alembic_revision']}) decided them in "
                f"{self.result.done['seconds']} s")


def _run(python, **kwargs):
    data = scenario(**{k: kwargs.pop(k) for k in ("seed", "per_list") if k in kwargs})
    data["cases"] = data["cases"] + intended_differences()
    result = run_oracle(python, data, **kwargs)
    return Agreement(data, result, decide_all(snapshot(result), data["cases"], result))


@pytest.fixture(scope="module")
def agreement(mm_python):
    """One oracle run (SQLite) for the whole module."""
    return _run(mm_python)


def test_oracle_decided_every_case(agreement, capsys):
    """Mailman reached a terminal outcome for every case: no error, no shunted message.
    (A failure in a terminal chain's side effects, e.g. an owner notification, cannot
    lose the outcome: the oracle records the chain before running it; such failures are
    only reported.)"""
    problems = [(row.case["id"], row.record["outcome"], row.record.get("error"))
                for row in agreement.rows if mailman_verdict(row.record) is None]
    assert not problems, problems
    assert set(agreement.result.cases) == {case["id"] for case in agreement.data["cases"]}
    side_effects = [row.case["id"] for row in agreement.rows
                    if row.record.get("side_effect_error")]
    if side_effects:
        with capsys.disabled():
            print(f"\n[mailman agreement] side effects failed (outcome kept): {side_effects}")


def test_native_engine_agrees_with_mailman(agreement, capsys):
    """Every case that is not an intended difference gets Mailman's verdict."""
    with capsys.disabled():
        report(agreement.summary("SQLite"))
    assert len(agreement.compared) >= 300
    assert not agreement.disagreements, (
        f"{len(agreement.disagreements)} disagreements with Mailman:\n"
        + table(agreement.disagreements))


def test_intended_differences_differ_as_documented(agreement):
    """Each intended difference gives exactly the documented Mailman outcome and policyd
    verdict, and has its section in docs/mailman-differences.md."""
    doc = DIFFERENCES_DOC.read_text(encoding="utf-8")
    documented = set(re.findall(r'^<a id="([a-z0-9-]+)"></a>$', doc, re.M))
    wrong = []
    for row in agreement.intended:
        case = row.case
        if (row.record["outcome"], row.policyd) != (case["expect_mailman"],
                                                     case["expect_policyd"]):
            wrong.append(row)
        assert case["difference"] in documented, f"{case['difference']} not documented"
        assert row.mailman != row.policyd, case["id"]
    assert not wrong, table(wrong)


def test_cases_cover_every_rule_and_action(agreement):
    """The agreeing cases exercise every Mailman rule policyd mirrors and every action
    value each can produce (a degenerate generator would make agreement meaningless)."""
    decided = {(row.decision.rule, row.decision.action) for row in agreement.compared}
    A, H, R, D, DEF = Action.ACCEPT, Action.HOLD, Action.REJECT, Action.DISCARD, Action.DEFER
    expected = {
        ("member-moderation", A), ("member-moderation", H), ("member-moderation", R),
        ("member-moderation", D),
        ("nonmember-moderation", A), ("nonmember-moderation", H),
        ("nonmember-moderation", R), ("nonmember-moderation", D),
        ("accept", DEF), ("banned-address", D), ("emergency", H), ("no-senders", D),
        ("unknown-list", None), ("administrative-address", None),
    }
    assert expected <= decided, expected - decided
    outcomes = {row.record["outcome"].split(":")[0] for row in agreement.compared}
    assert {"accept", "hold", "reject", "discard", "lmtp-550", "not-a-post"} <= outcomes
    hits = {hit for row in agreement.compared for hit in row.record["rule_hits"]}
    assert {"no-senders", "banned-address", "emergency", "member-moderation",
            "nonmember-moderation"} <= hits
    # Members found through another address of their user, on both sides.
    through_user = [row for row in agreement.compared
                    if row.decision.rule == "member-moderation"
                    and "through" in row.decision.reason]
    assert len(through_user) >= 5
    # Each kind of nonmember entry decided at least once.
    reasons = " ".join(row.decision.reason for row in agreement.compared)
    for needle in ("own action accept", "own action hold", "own action reject",
                   "own action discard", "own action defer", "in hold_these_nonmembers",
                   "in reject_these_nonmembers", "in discard_these_nonmembers",
                   "in accept_these_nonmembers", "'^", "'@friends@"):
        assert needle in reasons, needle


def test_snapshot_mirrors_mailman_membership(agreement):
    """The snapshot holds exactly Mailman's role=member addresses per list, direct
    memberships win over user ones, and other addresses of users are aliases."""
    snap = snapshot(agreement.result)
    for lst in agreement.result.lists:
        policy = snap.lists[lst["posting_address"]]
        assert set(policy.members) == {row["email"] for row in lst["members"]}
        direct = {row["email"]: row["action"] for row in lst["members"]
                  if row["via"] == "address"}
        for email, action in direct.items():
            assert policy.find_member(email) == (
                email, None if action is None else Action.from_name(action))
        for moderator in lst["moderators"]:
            if moderator not in policy.members:
                assert policy.find_member(moderator) is None
    targets = snap.lists["targets@lists.example.com"]
    assert targets.find_member("ann.work@corp.example")[0] == "ann@example.com"
    assert targets.find_member("fay.mixed@example.com") == ("fay.mixed@example.com", None)


def test_engine_fix_regressions_are_exercised(agreement):
    """The cases behind the engine fixes found by this suite are in it and agree."""
    ids = {row.case["id"]: row for row in agreement.compared}
    for case_id, verdict in (("t-idn-u-label-member", Verdict.REJECT),
                             ("t-trailing-dot-member", Verdict.REJECT),
                             ("t-double-at", Verdict.REJECT),
                             ("t-atlist-friend", Verdict.ACCEPT),
                             ("t-atlist-ben", Verdict.ACCEPT),
                             ("t-atlist-ben.alt", Verdict.REJECT),
                             ("t-atlist-acc-upper", Verdict.REJECT)):
        assert ids[case_id].decision.verdict is verdict, table([ids[case_id]])
        assert ids[case_id].mailman == verdict.value


def test_oracle_keeps_its_database_for_a_later_reader(mm_python, tmp_path):
    """With --keep the oracle says where its database is and leaves it there, built
    (Mailman's own tables, Alembic-stamped) and free of any row a case wrote."""
    data = {
        "domains": [{"mail_host": "keep.example.com", "alias_domain": None}],
        "lists": [{"fqdn": "kept@keep.example.com", "default_nonmember_action": "reject",
                   "members": [{"address": "m@example.com", "action": "hold"}]}],
        "cases": [{"id": "k1", "recipient": "kept@keep.example.com",
                   "envelope_sender": "n@example.com", "from": "n@example.com"}],
    }
    result = run_oracle(mm_python, data, keep=True)
    database = result.database
    try:
        assert database["kept"] is True
        assert result.cases["k1"]["outcome"] == "reject"
        path = Path(database["url"].removeprefix("sqlite:///"))
        assert path.is_file()
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT version_num FROM alembic_version").fetchone()[0] == \
                database["alembic_revision"]
            assert db.execute("SELECT list_name, mail_host FROM mailinglist").fetchall() == \
                [("kept", "keep.example.com")]
            # Only the member: the nonmember row Mailman made for n@ was rolled back.
            assert db.execute("SELECT role, moderation_action FROM member").fetchall() == \
                [(1, 0)]
            assert db.execute("SELECT email FROM address").fetchall() == [("m@example.com",)]
    finally:
        import shutil
        shutil.rmtree(database["var_dir"], ignore_errors=True)


@pytest.mark.postgres
def test_native_engine_agrees_with_mailman_on_postgresql(mm_python, postgres_database, capsys):
    """The same agreement with Mailman keeping its data in PostgreSQL (a smaller draw of
    the random cases, every hand-written case)."""
    run = _run(mm_python, database_url=postgres_database, per_list=3, seed=7)
    with capsys.disabled():
        report(run.summary("PostgreSQL"))
    assert run.result.database["url"] == postgres_database
    assert not [row for row in run.rows if mailman_verdict(row.record) is None]
    assert not run.disagreements, table(run.disagreements)
    wrong = [row for row in run.intended
             if (row.record["outcome"], row.policyd) != (row.case["expect_mailman"],
                                                          row.case["expect_policyd"])]
    assert not wrong, table(wrong)


def test_export_round_trips_through_list_specs(agreement):
    """Every list Mailman exported becomes one ListSpec, with its four nonmember lists and
    bans verbatim (the loader must not rewrite what Mailman compares verbatim)."""
    specs = {spec.posting_address: spec for spec in list_specs(agreement.result)}
    assert len(specs) == len(agreement.result.lists) == len(agreement.data["lists"])
    for lst in agreement.data["lists"]:
        spec = specs[lst["fqdn"]]
        for key in ("accept_these_nonmembers", "hold_these_nonmembers",
                    "reject_these_nonmembers", "discard_these_nonmembers", "bans"):
            # (Mailman lists bans sorted by their text.)
            order = sorted if key == "bans" else list
            assert order(getattr(spec, key)) == order(lst.get(key, ())), (lst["fqdn"], key)
    json.dumps(agreement.data)  # the scenario is plain JSON


# --- whole messages: the rules that read the message (tests/mailman/message_cases.py) ---

MESSAGE_RULES = ("approved", "loop", "header-match", "administrivia", "implicit-dest",
                 "max-recipients", "max-size", "news-moderation", "no-subject",
                 "suspicious-header")


def _mailman_rule(record) -> str:
    """The rule that decided in Mailman: its last rule hit (header-match-<list>-<n>
    counts as header-match), or ``accept`` when none hit."""
    hits = record["rule_hits"]
    if not hits:
        return "accept"
    return "header-match" if hits[-1].startswith("header-match") else hits[-1]


def test_message_rules_agree_rule_for_rule(agreement, capsys):
    """Every whole-message case (sent to policyd as the Exim ACL sends it: headers=,
    body=, size=) gets Mailman's verdict from the same rule Mailman's chain hit; the
    size per rule is printed and every rule of Mailman's chain that reads the message is
    covered with hits and misses."""
    rows = [row for row in agreement.compared if row.case["id"].startswith("msg-")]
    per_rule: dict[str, list[int]] = {}
    wrong = []
    for row in rows:
        counts = per_rule.setdefault(row.case["rule"], [0, 0])
        counts[0] += 1
        counts[1] += row.mailman != row.policyd
        if row.mailman != row.policyd or _mailman_rule(row.record) != row.decision.rule:
            wrong.append(row)
    with capsys.disabled():
        report("[mailman agreement, whole messages] " + ", ".join(
            f"{rule} {n} ({bad} disagreements)"
            for rule, (n, bad) in sorted(per_rule.items())))
    assert not wrong, table(wrong)
    decided = {row.decision.rule for row in rows}
    assert set(MESSAGE_RULES) <= decided, set(MESSAGE_RULES) - decided
    for rule in MESSAGE_RULES:
        assert per_rule.get(rule, [0])[0] >= 1, rule
    assert len(rows) >= 60


def test_moderator_announcement_through_the_exim_protocol(agreement):
    """Issue 16's case through the Exim protocol (the request the documented ACL sends,
    answered by EximFactory): a nonmember's announcement with the right Approved:
    password to a reject-nonmembers list is accepted, with a wrong one rejected, as
    Mailman decided them."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from policyd.core.replies import ReplyPolicy
    from policyd.decider import Decider, FixedSnapshot
    from policyd.protocols.exim import EximFactory
    from tests.mailman.harness import exim_line
    from tests.mailman.message_cases import moderator_announcement_cases

    class Config:
        timeout = 30.0
        max_request = 65536
        max_connections = 100
        max_buffered = 1 << 20

    decider = Decider(FixedSnapshot(snapshot(agreement.result)), ReplyPolicy())
    factory = EximFactory(decider, Config(), Clock())
    answers = {}
    for case in moderator_announcement_cases():
        transport = StringTransport()
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(transport)
        protocol.dataReceived(exim_line(case) + b"\n")
        answers[case["id"]] = transport.value().decode()
        assert agreement.result.cases[case["id"]]["outcome"] == (
            "accept" if case["id"] == "msg-appr-header" else "reject")
    assert answers["msg-appr-header"].startswith("ACCEPT "), answers
    assert answers["msg-appr-wrong"].startswith("REJECT 550"), answers
