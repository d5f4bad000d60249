"""Where a request's CPU time goes, stage by stage, without sockets (benchmark helper).

    python -m bench.stages STORE_URL EXIM_REQUESTS POSTFIX_REQUESTS [COUNT]

Loads the snapshot as the daemon does, then runs the daemon's own functions over the
request mixes, one stage at a time: parse, decide (header caches cold, then warm),
reply mapping, wire rendering, and the whole ``Decider.decide`` with and without its
per-decision log line (logged through the daemon's own observer into /dev/null).
Prints JSON, microseconds of CPU per request (thread CPU time, so that other processes
on a shared machine inflate the figures less than wall-clock time would).  The socket and reactor cost is what the
end-to-end figures add on top (compare with the bare Twisted server).
"""

from __future__ import annotations

import json
import sys
import time


def _per(started: float, n: int) -> float:
    return round((time.thread_time() - started) / n * 1e6, 2)


class _Holder:
    """What ``Decider`` reads: the current snapshot."""

    unavailable_reason = ""

    def __init__(self, snapshot) -> None:
        self.current = snapshot


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    url, exim_path, postfix_path = argv[:3]
    count = int(argv[3]) if len(argv) > 3 else 20000

    from twisted.logger import globalLogBeginner

    from policyd import addresses
    from policyd.chain import decide
    from policyd.config import StoreConfig, parse
    from policyd.logging import make_observer
    from policyd.protocols import exim, postfix
    from policyd.service import Decider
    from policyd.store import open_backend
    from policyd.wire import postfix_action

    config = parse("")
    policy = config.smtp
    backend = open_backend(StoreConfig("native", url, 2.0))
    snapshot = backend.load_snapshot()
    backend.close()

    with open(exim_path, "rb") as f:
        exim_lines = [line.rstrip(b"\n") for line in f][:count]
    with open(postfix_path, "rb") as f:
        blocks = [b + b"\n\n" for b in f.read().split(b"\n\n") if b.strip()][:count]

    out: dict = {"requests": len(exim_lines), "memberships": snapshot.membership_count}

    def clear_caches() -> None:
        for name in ("normalise", "parse_header", "parse_header_mailman3"):
            fn = getattr(addresses, name, None)
            if hasattr(fn, "cache_clear"):
                fn.cache_clear()

    # --- Exim ---------------------------------------------------------------------------
    n = len(exim_lines)
    t = time.thread_time()
    requests = [exim.parse_request(line) for line in exim_lines]
    out["exim_parse_us"] = _per(t, n)
    queries = [q for r in requests for q in r.queries()]
    clear_caches()
    t = time.thread_time()
    decisions = [decide(snapshot, q) for q in queries]
    out["exim_decide_cold_us"] = _per(t, n)
    t = time.thread_time()
    decisions = [decide(snapshot, q) for q in queries]
    out["exim_decide_warm_us"] = _per(t, n)
    t = time.thread_time()
    replies = [policy.reply(d) for d in decisions]
    out["exim_reply_us"] = _per(t, n)
    t = time.thread_time()
    for reply in replies:
        exim.format_reply(reply)
    out["exim_render_us"] = _per(t, n)

    # --- Postfix ------------------------------------------------------------------------
    m = len(blocks)
    reader = postfix.RequestReader()
    t = time.thread_time()
    parsed = [reader.feed(block)[0] for block in blocks]
    out["postfix_parse_us"] = _per(t, m)
    pqueries = [p.query() for p in parsed]
    clear_caches()
    t = time.thread_time()
    pdecisions = [decide(snapshot, q) for q in pqueries]
    out["postfix_decide_cold_us"] = _per(t, m)
    t = time.thread_time()
    pdecisions = [decide(snapshot, q) for q in pqueries]
    out["postfix_decide_warm_us"] = _per(t, m)
    t = time.thread_time()
    for d in pdecisions:
        postfix.format_response(postfix_action(d, policy.reply(d), "safe", "dunno"))
    out["postfix_reply_render_us"] = _per(t, m)

    # --- the whole Decider, with and without the log line -----------------------------
    holder = _Holder(snapshot)
    with open("/dev/null", "w") as sink:
        writer, observer = make_observer("info", sink)
        globalLogBeginner.beginLoggingTo([observer], discardBuffer=True,
                                         redirectStandardIO=False)
        quiet = Decider(holder, policy, log_decisions=False)
        loud = Decider(holder, policy, log_decisions=True)
        # alternate and keep the best of three: the difference is small next to noise
        for label in ("decider_nolog_us", "decider_log_us"):
            out[label] = float("inf")
        for _ in range(3):
            for label, decider in (("decider_nolog_us", quiet), ("decider_log_us", loud)):
                t = time.thread_time()
                for r in requests:
                    for q in r.queries():
                        decider.decide(q, "exim", r.id)
                out[label] = min(out[label], _per(t, n))
        writer.flush()
    out["log_line_us"] = round(out["decider_log_us"] - out["decider_nolog_us"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
