"""Agreement with the real Mailman 3.3.10 *through the mailman3 backend*.

The oracle (tests/mailman/oracle.py) builds the agreement scenario of tests/mailman/cases.py
in a real Mailman database with ``--keep`` and runs Mailman's posting chain on every case.
Here policyd does not get Mailman's exported view: ``Mailman3Backend`` reads that
database itself (the offline path of ``policyctl query --offline`` with ``[store] backend
= mailman3``), and ``policyd.core.chain.decide`` must give Mailman's verdict for every case
except the documented intended differences, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import shutil

import pytest

from tests.reporting import report
from policyd.store.mailman3 import Mailman3Backend
from tests.mailman.cases import intended_differences, scenario
from tests.mailman.harness import (
    decide_all,
    mailman_verdict,
    run_oracle,
    snapshot as exported_snapshot,
    table,
)

pytestmark = [pytest.mark.mailman, pytest.mark.integration]


def _agree(python, database_url=None, **scenario_args):
    data = scenario(**scenario_args)
    data["cases"] = data["cases"] + intended_differences()
    result = run_oracle(python, data, keep=True, database_url=database_url)
    backend = Mailman3Backend(result.database["url"])
    try:
        backend.check()
        snap = backend.load_snapshot()
        rows = decide_all(snap, data["cases"], result)
        described = backend.describe()
    finally:
        backend.close()
        shutil.rmtree(result.database["var_dir"], ignore_errors=True)
    return data, result, snap, rows, described


def _check(python, capsys, label, database_url=None, **scenario_args):
    data, result, snap, rows, described = _agree(python, database_url, **scenario_args)
    errors = [(row.case["id"], row.record.get("error")) for row in rows
              if mailman_verdict(row.record) is None]
    assert not errors, errors
    compared = [row for row in rows if "difference" not in row.case]
    intended = [row for row in rows if "difference" in row.case]
    disagreements = [row for row in compared if row.mailman != row.policyd]
    with capsys.disabled():
        report(f"\n[mailman3 backend agreement, {label}] {len(snap.lists)} lists, "
              f"{snap.membership_count} memberships read by {described}; "
              f"{len(rows)} cases: {len(compared)} compared, {len(disagreements)} "
              f"disagreements, {len(intended)} intended differences")
    assert len(compared) >= 100
    assert not disagreements, (f"{len(disagreements)} disagreements with Mailman:\n"
                               + table(disagreements))
    wrong = [row for row in intended
             if (row.record["outcome"], row.policyd) != (row.case["expect_mailman"],
                                                          row.case["expect_policyd"])]
    assert not wrong, table(wrong)
    _same_as_mailmans_view(snap, exported_snapshot(result))


def _same_as_mailmans_view(read, exported):
    """What the backend read from the tables equals what Mailman's own API exported."""
    assert dict(read.domains) == dict(exported.domains)
    assert _bans(read.site_bans) == _bans(exported.site_bans)
    assert set(read.lists) == set(exported.lists)
    for address, mine in read.lists.items():
        theirs = exported.lists[address]
        for field in ("list_id", "display_name", "emergency", "default_member_action",
                      "default_nonmember_action", "members", "member_actions",
                      "member_aliases", "nonmembers", "nonmember_patterns"):
            assert getattr(mine, field) == getattr(theirs, field), (address, field)
        assert _bans(mine.bans) == _bans(theirs.bans), address


def _bans(bans):
    # Mailman's ban manager lists bans by email; the order never changes a verdict.
    return bans.exact, sorted(pattern.text for pattern in bans.patterns)


def test_backend_agrees_with_mailman_sqlite(mailman_python, capsys):
    """Zero disagreements with Mailman reading its SQLite database directly."""
    _check(mailman_python, capsys, "SQLite")


@pytest.mark.postgres
def test_backend_agrees_with_mailman_postgresql(mailman_python, pg_database, capsys):
    """Zero disagreements with Mailman reading its PostgreSQL database directly."""
    _check(mailman_python, capsys, "PostgreSQL", database_url=pg_database, per_list=4,
           seed=7)
