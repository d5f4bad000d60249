"""Where a request's CPU time goes, stage by stage, without sockets (benchmark helper).

    python -m bench.stages STORE_URL EXIM_REQUESTS POSTFIX_REQUESTS [COUNT]

Loads the snapshot as the daemon does, then runs the daemon's own functions over the
request mixes, one stage at a time: parse, decide (header caches cold, then warm; the
MTA path, without the trace, as the daemon decides), reply mapping, wire rendering, the
whole Exim factory path (``Decider.decide``, the reply, the line) with and without its
per-decision log line (logged through the daemon's own observer into /dev/null), and
the whole Postfix request as the daemon's protocol takes it from a read (framing,
parse, decision, answer) with and without its line.
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

    from policyd.core import addresses
    from policyd.core.chain import decide
    from policyd.config import StoreConfig, parse
    from policyd.logging import make_observer
    from policyd.protocols import exim, postfix
    from policyd.decider import Decider
    from policyd.logging import DecisionLog
    from policyd.store import open_backend
    from policyd.protocols.postfix import postfix_action

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
    # Per query, not per request line: a few Exim requests name two lists.

    def clear_caches() -> None:
        """Empty every memo cache of the address and rule code (whatever their names)."""
        import policyd.core.rules

        for module in (addresses, policyd.core.rules):
            for value in vars(module).values():
                if callable(getattr(value, "cache_clear", None)):
                    value.cache_clear()

    def best(fn, items, *, cold=False, reps=3):
        """Best of ``reps`` passes, microseconds of CPU per item (and the last results)."""
        best_us = float("inf")
        for _ in range(reps):
            if cold:
                clear_caches()
            t = time.thread_time()
            for item in items:  # results dropped at once, as in the daemon
                fn(item)
            best_us = min(best_us, _per(t, len(items)))
        return best_us, [fn(item) for item in items]

    # --- Exim ---------------------------------------------------------------------------
    out["exim_parse_us"], requests = best(exim.parse_request, exim_lines)
    queries = [q for r in requests for q in r.queries()]
    out["exim_decide_cold_us"], _ = best(lambda q: decide(snapshot, q, explain=False),
                                         queries, cold=True)
    out["exim_decide_warm_us"], decisions = best(lambda q: decide(snapshot, q, explain=False),
                                                 queries)
    out["exim_reply_us"], replies = best(policy.reply, decisions)
    out["exim_render_us"], _ = best(exim.format_reply, replies)

    # --- Postfix ------------------------------------------------------------------------
    reader = postfix.RequestReader()
    out["postfix_parse_us"], parsed = best(lambda block: reader.feed(block)[0], blocks)
    pqueries = [p.query() for p in parsed]
    out["postfix_decide_cold_us"], _ = best(lambda q: decide(snapshot, q, explain=False),
                                            pqueries, cold=True)
    out["postfix_decide_warm_us"], pdecisions = best(
        lambda q: decide(snapshot, q, explain=False), pqueries)
    out["postfix_reply_render_us"], _ = best(
        lambda d: postfix.format_response(postfix_action(d, policy.reply(d), "safe", "dunno")),
        pdecisions)

    # --- the whole Decider, with and without the log line -----------------------------
    holder = _Holder(snapshot)
    with open("/dev/null", "w") as sink:
        writer, observer = make_observer("info", sink)
        globalLogBeginner.beginLoggingTo([observer], discardBuffer=True,
                                         redirectStandardIO=False)
        decider = Decider(holder, policy)
        # The Exim factory's whole path: decide, render, log (the daemon's direct line).
        quiet = exim.EximFactory(decider, config.exim, None, DecisionLog(enabled=False))
        loud = exim.EximFactory(decider, config.exim, None, DecisionLog(writer=writer))
        # alternate and keep the best of three: the difference is small next to noise
        for label in ("decider_nolog_us", "decider_log_us"):
            out[label] = float("inf")
        for _ in range(3):
            for label, factory in (("decider_nolog_us", quiet), ("decider_log_us", loud)):
                t = time.thread_time()
                for line in exim_lines:
                    factory.answer(line, None)
                out[label] = min(out[label], _per(t, len(exim_lines)))
        # The Postfix protocol's whole path from a read (the daemon's mode: envelope),
        # answers dropped where the daemon would send them.
        envelope = parse("[postfix]\nmode = envelope\n").postfix
        for label in ("postfix_request_nolog_us", "postfix_request_log_us"):
            out[label] = float("inf")
        for _ in range(3):
            for label, enabled in (("postfix_request_nolog_us", False),
                                   ("postfix_request_log_us", True)):
                factory = postfix.PostfixFactory(
                    decider, envelope, None,
                    DecisionLog(enabled=False) if not enabled else DecisionLog(writer=writer))
                factory.write = lambda transport, data: None
                protocol = postfix.PostfixPolicyProtocol(factory)
                protocol.transport = None
                t = time.thread_time()
                for block in blocks:
                    protocol.dataReceived(block)
                out[label] = min(out[label], _per(t, len(blocks)))
        writer.flush()
    out["log_line_us"] = round(out["decider_log_us"] - out["decider_nolog_us"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
