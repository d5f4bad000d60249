"""A store copy for the cost of SMTP-time moderation in lookups only (issue 17).

    python -m bench.modprime STORE.sqlite MODE EXIM_REQUESTS POSTFIX_REQUESTS

Sets ``smtp_moderation = MODE`` (``greylist``) on every list of the SQLite store, then
decides every request of the two mixes in-process (the daemon's own parser and chain)
and, for each one moderation would look at (a ``hold`` by ``nonmember-moderation``),
writes its (list, sender) into the moderation state as a sender that passed the greylist,
remembered for 30 days (``policyd.store.moderation.write_changes``, the daemon's own
batch writer).  A daemon started on the store afterwards answers each such request with a
lookup in its index (``remembered``: the list's normal outcome) and creates no state row
per request; every other request passes moderation at its first test.

Prints JSON: the requests per mix, how many reach the moderation lookup, the distinct
(list, sender) pairs written, and one of them for a control query.
"""

from __future__ import annotations

import json
import sys
import time


def _requests(exim_path: str, postfix_path: str):
    """(protocol, query) for every request of both mixes, as the daemon builds them."""
    from policyd.protocols import exim, postfix

    with open(exim_path, "rb") as f:
        for line in f:
            try:
                request = exim.parse_request(line.rstrip(b"\n"))
            except Exception:  # noqa: BLE001 - a malformed request: the daemon's DEFER
                continue
            if request.message is None:
                continue  # moderation runs at DATA only: the request with the message
            for query in request.queries():
                yield "exim", query
    reader = postfix.RequestReader()
    with open(postfix_path, "rb") as f:
        for request in reader.feed(f.read()):
            if isinstance(request, Exception):
                continue
            query = request.query()
            if query is not None:
                yield "postfix", query


def prime(store: str, mode: str, exim_path: str, postfix_path: str) -> dict:
    import sqlite3

    from policyd.config import StoreConfig
    from policyd.core.chain import decide
    from policyd.core.moderation import Changes
    from policyd.core.verdict import Verdict
    from policyd.moderation_service import _RULE, _field
    from policyd.store import open_backend
    from policyd.store.moderation import write_changes

    db = sqlite3.connect(store)
    with db:
        db.execute("UPDATE lists SET smtp_moderation = ?", (mode,))
    db.close()
    backend = open_backend(StoreConfig("native", f"sqlite:///{store}", 2.0))
    snapshot = backend.load_snapshot()
    counts: dict = {"exim": [0, 0], "postfix": [0, 0]}
    pairs: dict = {}
    sample = None
    for protocol, query in _requests(exim_path, postfix_path):
        counts[protocol][0] += 1
        decision = decide(snapshot, query)
        if decision.verdict is not Verdict.HOLD or decision.rule != _RULE:
            continue
        counts[protocol][1] += 1
        key = (decision.list, _field(decision.sender or query.envelope_sender))
        pairs[key] = None
        if sample is None and protocol == "postfix":
            sample = {"recipient": query.recipient, "sender": query.envelope_sender,
                      "list": key[0], "key_sender": key[1]}
    until = time.time() + 30 * 86400
    write_changes(backend.moderation_engine, Changes(remembered={k: until for k in pairs}))
    backend.close()
    return {"mode": mode,
            "exim_requests": counts["exim"][0], "exim_lookups": counts["exim"][1],
            "postfix_requests": counts["postfix"][0], "postfix_lookups": counts["postfix"][1],
            "remembered": len(pairs), "sample": sample}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    store, mode, exim_path, postfix_path = argv[:4]
    print(json.dumps(prime(store, mode, exim_path, postfix_path)))


if __name__ == "__main__":
    main()
