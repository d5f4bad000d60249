"""Two source trees side by side: closed-loop q/s and CPU per request (``make bench-ab``).

    python -m bench.ab --state-dir build/bench [--rounds 5] [--before REV | --tree DIR ...]

What issue 11 asks of a change ("no figure worse by more than 5 %") needs both versions
measured by the same harness, on the same store and request mix, within minutes of each
other: machine-wide noise on a shared 2-core VM moves single figures by 10-20 % between
runs, far more than the difference sought.  This runs each tree's own daemon (its own
virtualenv: ``make venv`` in a worktree of it) with the configuration ``bench.runner``
writes, on the 1,000-list / 10,000-membership store of ``make bench`` and its request
mixes, Postfix (``envelope`` mode) and Exim at concurrency 8, and alternates the trees
within each round (the other daemons SIGSTOPped while one is measured).  It prints the
median q/s and server CPU per request per tree, and the ratio to the first tree.

``--shape exim-headers`` (repeatable with ``postfix`` and ``exim``) measures Exim's
DATA-ACL request with a 2-4 KB header block (``bench.headermix``) instead.

``--before REV`` compares REV (checked out in ``STATE/ab/REV``, its virtualenv made there
if missing) with this tree; ``--tree DIR`` (repeatable) names trees directly, the first
being the reference.  Exit status 1 when a later tree is more than ``--limit`` (5 %)
slower than the first on any shape, by the median CPU per request.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .runner import REPO, Bench, Daemon, log, median, ram_directory

SHAPES = ("postfix", "exim")
# ``exim-headers``: Exim's DATA-ACL request with a 2-4 KB header block (``bench.headermix``).
ALL_SHAPES = SHAPES + ("exim-headers",)


def worktree(state: Path, rev: str) -> Path:
    """``rev`` checked out under ``state/ab`` with its own virtualenv."""
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=REPO,
                         check=True, capture_output=True, text=True).stdout.strip()
    tree = state / "ab" / sha[:12]
    if not (tree / ".git").exists():
        tree.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--force", "--detach", str(tree), sha],
                       cwd=REPO, check=True)
    if not (tree / ".venv" / "bin" / "policyd").exists():
        log(f"making the virtualenv of {rev} ({sha[:12]}) in {tree}")
        subprocess.run(["make", "venv"], cwd=tree, check=True)
    return tree


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--before", help="a git revision to compare this tree with")
    parser.add_argument("--tree", action="append", default=[],
                        help="a source tree with its own .venv (repeatable; first = ref)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--shape", action="append", choices=ALL_SHAPES, dest="shapes",
                        help=f"what to measure (repeatable; default: {', '.join(SHAPES)})")
    parser.add_argument("--limit", type=float, default=0.05,
                        help="how much more CPU per request a later tree may take")
    args = parser.parse_args(argv)
    shapes = tuple(args.shapes or SHAPES)
    state = Path(args.state_dir).resolve()
    trees = [Path(t).resolve() for t in args.tree]
    if args.before:
        trees = [worktree(state, args.before), REPO]
    if len(trees) < 2:
        parser.error("give --before REV or at least two --tree")
    bench = Bench.alternating(state, args.rounds, args.duration)
    with bench.stack:
        pristine = bench.small_workload()
        requests = {shape: None for shape in shapes}
        if "exim-headers" in shapes:
            requests["exim-headers"] = bench._header_mix(bench.small, bench.mixes, 20_000)
        work = Path(tempfile.mkdtemp(prefix="policyd-ab-"))
        bench.stack.callback(shutil.rmtree, work, ignore_errors=True)
        # The logs on a RAM file system where there is one (as in ``make bench``).
        ram = ram_directory()
        logs = Path(tempfile.mkdtemp(prefix="policyd-ab-logs-", dir=ram)) if ram else work
        bench.stack.callback(shutil.rmtree, logs, ignore_errors=True)
        names = {}
        for i, tree in enumerate(trees):
            name = f"tree{i}"
            names[name] = tree
            daemon = Daemon(tree / ".venv" / "bin" / "python", work, work, name,
                            f"sqlite:///{pristine}", log_dir=logs)
            bench.stack.callback(daemon.stop)
            daemon.wait_ready()
            bench.servers[name] = {"pid": daemon.pid, "daemon": daemon,
                                   "exim": f"unix:{daemon.exim}",
                                   "postfix": f"unix:{daemon.postfix}"}
        cpu: dict = {}
        qps: dict = {}
        for round_ in range(args.rounds):
            log(f"round {round_ + 1} of {args.rounds}")
            for name in names:
                server = bench.servers[name]
                for shape in shapes:
                    protocol = shape.partition("-")[0]
                    result = bench.run_load(f"{name} {shape}", protocol, server[protocol], 8,
                                            server_pid=server["pid"],
                                            requests=requests[shape])
                    bench.truncate_logs()
                    qps.setdefault((name, shape), []).append(result["qps"])
                    cpu.setdefault((name, shape), []).append(
                        result.get("server_cpu_us_per_req"))
                    log(f"  {name} {shape:12} {result['qps']:>9,.0f} q/s  "
                        f"{result.get('server_cpu_us_per_req')} µs/req")
    print("\n| tree | shape | q/s (median) | CPU µs/req (median) | CPU vs first |")
    print("|---|---|---|---|---|")
    worse = []
    first = next(iter(names))
    for shape in shapes:
        ref = median(cpu[first, shape])
        for name, tree in names.items():
            mine = median(cpu[name, shape])
            ratio = mine / ref if ref else float("nan")
            if name != first and ratio > 1 + args.limit:
                worse.append(f"{tree} {shape} {ratio:.3f} x")
            print(f"| {tree} | {shape} | {median(qps[name, shape]):,.0f} | {mine:.1f} | "
                  f"{ratio:.3f} x |")
    verdict = (f"FAIL: more than {args.limit:.0%} more CPU per request: " + "; ".join(worse)
               if worse else f"PASS: within {args.limit:.0%} of the first tree")
    print(f"\n{verdict} ({args.rounds} rounds of {args.duration:g} s per tree and shape)")
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
