"""``dmarc-mitigation`` against the real Mailman 3.3.10, with real DNS on 127.0.0.1.

A small authoritative server (tests/mailman/dns_server.py, twisted.names) serves the DMARC
records of tests/mailman/dmarc_cases.py on a free port.  The oracle's Mailman asks it
through dnspython (its ``Resolver`` pointed there) and runs its own chain; policyd asks it
through ``policyd.dmarc_lookup`` (Twisted's DNS client) and decides through the
``Decider``, waiting for the lookup as the daemon does.  Both read the same public suffix
list.  Every case must agree.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import pytest_twisted

from policyd.core.replies import ReplyPolicy
from policyd.decider import Decider, FixedSnapshot
from policyd.dmarc_lookup import DmarcLookup
from tests.mailman import dmarc_cases
from tests.mailman.dns_process import serving
from tests.mailman.harness import mailman_verdict, query, run_oracle, snapshot, table
from tests.reporting import report

pytestmark = [pytest.mark.mailman, pytest.mark.integration]


@pytest.fixture(scope="module")
def dns_port():
    """The test's DNS server serving the DMARC cases' zone."""
    with serving(dmarc_cases.ZONE) as port:
        yield port


@pytest.fixture(scope="module")
def suffixes(tmp_path_factory):
    path = tmp_path_factory.mktemp("psl") / "public_suffix_list.dat"
    path.write_text(dmarc_cases.PUBLIC_SUFFIXES, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def oracle(mm_python, dns_port, suffixes):
    data = dmarc_cases.scenario(dns_port, str(suffixes))
    return data, run_oracle(mm_python, data)


async def _decide_all(data, result, dns_port, suffixes, snap=None):
    from twisted.internet import reactor

    lookup = DmarcLookup(reactor, suffixes, servers=[("127.0.0.1", dns_port)], timeout=2)
    decider = Decider(FixedSnapshot(snap or snapshot(result)), ReplyPolicy(),
                      run_in_thread=lambda *args: None)
    decider.use_dmarc(lookup)
    rows, waited = [], 0
    for case in data["cases"]:
        q = query(case)
        answer = decider.decide(q, "exim", names_a_list=True)
        for _ in range(3):
            if answer.pending is None:
                break
            waited += 1
            await decider.verify([answer.pending])
            answer = decider.decide(q, "exim", names_a_list=True)
        rows.append((case, result.cases[case["id"]], answer))
    return rows, waited, lookup


@pytest_twisted.ensureDeferred
async def test_dmarc_agreement(oracle, dns_port, suffixes, capsys):
    """Each DMARC case: Mailman's outcome (also checked against the expected outcome)
    equals policyd's verdict, decided after the asynchronous lookup."""
    data, result = oracle
    await _compare(data, result, dns_port, suffixes, capsys, "dmarc")


@pytest_twisted.ensureDeferred
async def test_dmarc_agreement_through_the_backend(mm_python, dns_port, suffixes, capsys):
    """The same cases with the lists read by ``Mailman3Backend`` from the database the
    oracle's Mailman wrote (SQLite): its DMARC settings equal what Mailman's API
    exported, and every case agrees."""
    import shutil

    from policyd.store.mailman3 import Mailman3Backend

    data = dmarc_cases.scenario(dns_port, str(suffixes))
    result = run_oracle(mm_python, data, keep=True)
    backend = Mailman3Backend(result.database["url"])
    try:
        snap = backend.load_snapshot()
    finally:
        backend.close()
        shutil.rmtree(result.database["var_dir"], ignore_errors=True)
    exported = snapshot(result)
    for address, policy in snap.lists.items():
        assert policy.content == exported.lists[address].content, address
    await _compare(data, result, dns_port, suffixes, capsys, "dmarc, mailman3 backend",
                   snap)


async def _compare(data, result, dns_port, suffixes, capsys, label, snap=None):
    rows, waited, lookup = await _decide_all(data, result, dns_port, suffixes, snap)
    problems = [(case["id"], record["outcome"], (record.get("error") or "")[-300:])
                for case, record, _ in rows if mailman_verdict(record) is None]
    assert not problems, problems
    wrong_oracle = [(case["id"], record["outcome"], dmarc_cases.expected(case["id"]))
                    for case, record, _ in rows
                    if mailman_verdict(record) != dmarc_cases.expected(case["id"])]
    assert not wrong_oracle, wrong_oracle
    # A failed lookup on a list that rejects or discards: Mailman mitigates, policyd
    # answers the temporary failure (intended; and only there).
    intended = [(case, record, answer) for case, record, answer in rows
                if dmarc_cases.dns_failure(case["id"])
                and mailman_verdict(record) in ("reject", "discard")]
    assert intended and all(answer.decision is not None
                            and answer.decision.verdict.value == "defer"
                            and answer.decision.rule == "dmarc-mitigation"
                            for _, _, answer in intended)
    disagreements = [(case, record, answer) for case, record, answer in rows
                     if (case, record, answer) not in intended
                     and (answer.decision is None
                          or answer.decision.verdict.value != mailman_verdict(record))]
    with capsys.disabled():
        report(f"\n[mailman agreement, {label}] {len(rows)} cases, "
               f"{len(disagreements)} disagreements, {len(intended)} intended differences "
               f"(a failed lookup: 4xx), {waited} decisions waited for DNS "
               f"({lookup.counts['lookups']} lookups, {lookup.counts['failures']} "
               f"failures)")
    if disagreements:
        from tests.mailman.harness import Row
        shown = [Row(case, record, answer.decision) for case, record, answer in
                 disagreements if answer.decision is not None]
        pytest.fail(f"{len(disagreements)} disagreements:\n" + table(shown) + "\n" +
                    repr([(c["id"], a.trouble, a.reason) for c, _, a in disagreements
                          if a.decision is None]))
    # Mitigated by reject/discard lists only; every kind of answer was seen.
    hits = {answer.decision.rule for _, _, answer in rows}
    assert "dmarc-mitigation" in hits
    assert lookup.counts["failures"] >= 3


def test_organizational_domains_agree_with_mailman(mm_python, tmp_path):
    """policyd's PublicSuffixList (a trie) gives the organizational domain Mailman's
    get_organizational_domain gives, on the public suffix list Mailman ships: every rule
    (wildcards, exceptions, IDN) with one to three labels in front."""
    from policyd.core.dmarc import PublicSuffixList

    path = subprocess.run(
        [str(mm_python), "-c", "import mailman.rules.data, os; print(os.path.join("
         "os.path.dirname(mailman.rules.data.__file__), 'public_suffix_list.dat'))"],
        capture_output=True, text=True, check=True).stdout.strip()
    rules = []
    with open(path, encoding="utf-8") as fp:
        for line in fp:
            line = line.strip()
            if line and not line.startswith("//"):
                rules.append(line.split()[0].lstrip("!").replace("*", "wild"))
    domains = ["example.com", "a.b.c.example.com", "unknown", "a.b.unknown"]
    for rule in rules[::4]:
        domains += [rule, "a." + rule, "b.a." + rule, "c.b.a." + rule]
    (tmp_path / "domains.json").write_text(json.dumps(domains), encoding="utf-8")
    script = ("import json, sys; from mailman.rules import dmarc; "
              "dmarc.parse_suffix_list(sys.argv[1]); "
              "print(json.dumps([dmarc.get_organizational_domain(d) for d in "
              "json.load(open(sys.argv[2], encoding='utf-8'))]))")
    theirs = json.loads(subprocess.run(
        [str(mm_python), "-c", script, path, str(tmp_path / "domains.json")],
        capture_output=True, text=True, check=True, timeout=600).stdout)
    mine = PublicSuffixList.from_file(path)
    differ = [(d, t, mine.organizational_domain(d)) for d, t in zip(domains, theirs)
              if mine.organizational_domain(d) != t]
    assert not differ, differ[:20]
    assert len(domains) > 2000
