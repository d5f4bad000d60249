"""Where a Postfix request's CPU goes in the daemon: policyd with parts of its request
path cut away, beside the bare Twisted servers (benchmark helper).

    python -m bench.floor --state-dir build/bench [--rounds 5] [--duration 3]

On ``make bench``'s 10,000-membership store and Postfix mix, at concurrency 8 (its closed
loop), each round measures in turn (the others SIGSTOPped meanwhile):

==============  ==========================================================================
``policyd``     the daemon as ``make bench`` runs it (``envelope`` mode, a decision line
                per request to a RAM file system)
``no-line``     the same with ``[daemon] log_level = warn``: no decision line
``parse-only``  each request framed and parsed as usual, then answered ``DUNNO``: no
                decision, no line, no counter
``io-only``     each read answered ``DUNNO`` unparsed: policyd's reactor, socket and
                write path alone (one answer per read, which holds for this load: every
                connection has one request out at a time)
``constant``    ``bench.refserver``: stock Twisted, a constant answer
``lookup``      ``bench.refserver --lookup``: stock Twisted, the dict of attributes and
                one set probe
==============  ==========================================================================

It prints the median q/s and server CPU per request (user and system time) of each, and
what the closed-loop target (policyd >= 0.6 x the constant server) leaves for policyd's
own request work above its ``io-only`` floor.  The variants are made by replacing one
method in the daemon's process (``--variant``, below); nothing of this is in the daemon.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

VARIANTS = ("policyd", "no-line", "parse-only", "io-only")
REFERENCES = ("constant", "lookup")

def closed_loop_target() -> float:
    """``bench.verdict``'s Postfix closed-loop limit (policyd / constant)."""
    from .verdict import TARGETS

    return next(t for t in TARGETS if t.key == "postfix_c8_vs_constant").limit


def run_variant(variant: str, argv: list[str]) -> int:
    """The daemon's ``main`` with ``variant``'s cut made first."""
    from policyd.protocols import postfix

    if variant == "parse-only":
        def answer(self, request, transport=None):
            return postfix.DUNNO
        postfix.PostfixFactory.answer = answer
    elif variant == "io-only":
        def dataReceived(self, data):
            self.reads += 1
            self.factory.write(self.transport, postfix.DUNNO)
        postfix.PostfixPolicyProtocol.dataReceived = dataReceived
    elif variant not in ("policyd", "no-line"):
        raise SystemExit(f"bench.floor: unknown variant {variant!r}")
    from policyd.daemon import main

    return main(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--variant"]:
        return run_variant(argv[1], argv[2:])
    parser = argparse.ArgumentParser(prog="python -m bench.floor",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args(argv)

    from .runner import Bench, Daemon, cpu_times, log, median, ram_directory

    state = Path(args.state_dir).resolve()
    bench = Bench.alternating(state, args.rounds, args.duration)
    with bench.stack:
        pristine = bench.small_workload()
        work = Path(tempfile.mkdtemp(prefix="policyd-floor-"))
        bench.stack.callback(shutil.rmtree, work, ignore_errors=True)
        bench.sockdir = work
        ram = ram_directory()
        logs = Path(tempfile.mkdtemp(prefix="policyd-floor-logs-", dir=ram)) if ram else work
        bench.stack.callback(shutil.rmtree, logs, ignore_errors=True)
        bench.logdir = logs
        python = Path(sys.executable)
        for variant in VARIANTS:
            store = work / f"{variant}.sqlite"
            shutil.copyfile(pristine, store)
            command = None if variant in ("policyd", "no-line") else \
                [str(python), "-m", "bench.floor", "--variant", variant]
            daemon = Daemon(python, work, work, variant, f"sqlite:///{store}", log_dir=logs,
                            daemon_extra="log_level = warn\n" if variant == "no-line" else "",
                            command=command)
            bench.stack.callback(daemon.stop)
            daemon.wait_ready()
            bench.servers[variant] = {"pid": daemon.pid, "postfix": f"unix:{daemon.postfix}"}
        bench.start_refserver("constant")
        bench.start_refserver("lookup", lookup=pristine)
        figures: dict = {}
        for round_ in range(args.rounds):
            log(f"round {round_ + 1} of {args.rounds}")
            for name in VARIANTS + REFERENCES:
                pid = bench.servers[name]["pid"]
                before = cpu_times(pid)
                result = bench.run_load(name, "postfix", bench.servers[name]["postfix"], 8,
                                        server_pid=pid)
                after = cpu_times(pid)
                bench.truncate_logs()
                # ``make bench``'s CPU per request, split as the process's times were.
                total = result.get("server_cpu_us_per_req") or float("nan")
                used = (after[0] - before[0]) + (after[1] - before[1])
                user = total * (after[0] - before[0]) / used if used else float("nan")
                system = total - user
                for key, value in (("qps", result["qps"]), ("user", user),
                                   ("system", system)):
                    figures.setdefault((name, key), []).append(value)
                log(f"  {name:11} {result['qps']:>9,.0f} q/s  user {user:5.1f}  "
                    f"system {system:5.1f} µs/req")
    rows = {name: {key: median(figures[name, key]) for key in ("qps", "user", "system")}
            for name in VARIANTS + REFERENCES}
    print("\n| server | q/s (median) | CPU µs/req | user | system |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['qps']:,.0f} | {row['user'] + row['system']:.1f} | "
              f"{row['user']:.1f} | {row['system']:.1f} |")
    cpu = {name: row["user"] + row["system"] for name, row in rows.items()}
    target = closed_loop_target()
    budget = cpu["constant"] / target
    print(f"\npolicyd / constant: {rows['policyd']['qps'] / rows['constant']['qps']:.2f} x. "
          f"At {target:g} x the constant server's q/s and the same CPU share, a request may "
          f"cost {budget:.1f} µs: {budget - cpu['io-only']:.1f} µs above policyd's io-only "
          f"floor ({cpu['io-only']:.1f} µs), where the request work measured "
          f"{cpu['policyd'] - cpu['io-only']:.1f} µs (parsing "
          f"{cpu['parse-only'] - cpu['io-only']:.1f}, the decision line "
          f"{cpu['policyd'] - cpu['no-line']:.1f}, the rest "
          f"{cpu['no-line'] - cpu['parse-only']:.1f}; {args.rounds} rounds of "
          f"{args.duration:g} s).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
