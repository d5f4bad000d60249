"""Sample a running daemon with py-spy and say where its time goes (benchmark helper).

Used by ``python -m bench --py-spy PATH`` (py-spy is not a dependency: pass the path of
a py-spy binary, e.g. from ``pip install py-spy``).  ``record`` samples the daemon while
the load generator runs; ``summarise`` turns py-spy's raw (collapsed) stacks into shares
by category and the functions with the most self time.
"""

from __future__ import annotations

import collections
import subprocess
from pathlib import Path

CATEGORIES = (
    ("log line (twisted.logger, policyd.logging)",
     ("Logger.", "logging.py", "_observer.py", "_filter.py", "_format")),
    ("decision (chain, rules, addresses, snapshot)",
     ("chain.py", "rules.py", "addresses.py", "snapshot.py")),
    ("reply mapping and rendering (replies, protocols)",
     ("replies.py", "format_reply", "reply_line", "format_response", "postfix_action")),
    ("request parsing (protocol codecs)",
     ("parse_request", "RequestReader.feed", ".queries", "_b64", "PostfixRequest.query")),
    ("Decider bookkeeping (service.py)", ("service.py",)),
)


def record(py_spy: str, pid: int, seconds: float, out: Path) -> None:
    subprocess.run([py_spy, "record", "-p", str(pid), "-d", str(max(1, round(seconds))), "-r", "250",
                    "-f", "raw", "-o", str(out), "--nonblocking"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def summarise(raw: Path, top: int = 12) -> dict:
    categories: collections.Counter = collections.Counter()
    self_time: collections.Counter = collections.Counter()
    total = 0
    if not raw.exists():
        return {"samples": 0}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        self_time[frames[-1]] += n
        category = None
        for name, keys in CATEGORIES:
            if any(key in frame for frame in frames for key in keys):
                category = name
                break
        if category is None:
            if "epollreactor.py:227" in frames[-1]:
                category = "idle (epoll_wait)"
            elif "_bootstrap" in frames[0]:
                category = "other threads (store refresh)"
            else:
                category = "reactor and transport (Twisted)"
        categories[category] += n
    if not total:
        return {"samples": 0}
    return {
        "samples": total,
        "categories": {k: round(100 * v / total, 1) for k, v in categories.most_common()},
        "top_self": [(k, round(100 * v / total, 1)) for k, v in self_time.most_common(top)],
    }
