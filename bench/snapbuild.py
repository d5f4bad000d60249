"""Time one snapshot build from a store, the way the daemon builds it (benchmark helper).

    python -m bench.snapbuild URL

Prints JSON: build seconds, membership count, RSS growth.  Run in a fresh process (and
pinned by the caller) so each build starts cold, like a daemon's first load.
"""

from __future__ import annotations

import json
import sys
import time


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    from policyd.config import StoreConfig
    from policyd.store import open_backend

    backend = open_backend(StoreConfig("native", argv[0], 2.0))
    backend.change_token()  # connect and warm the driver outside the timing
    before = rss_kib()
    started = time.perf_counter()
    snapshot = backend.load_snapshot()
    elapsed = time.perf_counter() - started
    after = rss_kib()
    backend.close()
    print(json.dumps({"build_s": elapsed, "memberships": snapshot.membership_count,
                      "lists": len(snapshot.lists), "rss_growth_kib": after - before}))


if __name__ == "__main__":
    main()
