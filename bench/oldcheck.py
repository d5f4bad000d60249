"""The fork-exec baseline: what the old Exim ``${run}`` recipe ran once per message.

    python3 oldcheck.py STORE.sqlite LIST ENVELOPE_SENDER FROM_ADDRESS

Opens the same SQLite store as policyd, answers by exit status: 0 a member posts
(From: first, then the envelope sender), 1 not a member, 2 no such list.  Deliberately
the simple script people ran (``import sqlite3``, one query), not policyd's semantics: it
is the cost of a process per query that this benchmark compares against.
"""

import sqlite3
import sys


def main(argv):
    store, recipient, envelope, from_address = argv[1:5]
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    row = db.execute("SELECT id FROM lists WHERE posting_address = ?",
                     (recipient.lower(),)).fetchone()
    if row is None:
        return 2
    for address in (from_address, envelope):
        if address and address != "<>":
            hit = db.execute(
                "SELECT 1 FROM memberships m JOIN addresses a ON a.id = m.address_id "
                "WHERE m.list_id = ? AND a.email = ? AND m.role = 1",
                (row[0], address.lower())).fetchone()
            if hit:
                return 0
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
