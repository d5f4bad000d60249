"""``python -m bench --state-dir DIR``: every performance figure of issue 6, with targets.

What one run does (about 6-8 minutes on a 2-core machine):

1. builds the C load generator, generates the 1,000-list / 1,000,000-membership SQLite
   store and the request mixes (kept in DIR and reused while their generator is
   unchanged; every run works on a fresh copy of the store);
2. starts policyd on that store and the bare Twisted reference server, both pinned to
   CPU 0; the load generator runs on CPU 1;
3. throughput and latency: Exim (connection per query, Unix socket) at concurrency 1, 8,
   64; Postfix (persistent connections) over Unix and TCP at 1, 8, 64; each figure run
   ``--runs`` times (default 3), policyd and the reference interleaved so that a
   disturbance of the host hits both; medians are reported;
4. latency at half of policyd's maximum rate (fixed-rate schedule, latency counted from
   the scheduled start);
5. the fork-exec baseline (``bench/oldcheck.py`` started per query) at concurrency 1
   (pinned to CPU 0, one core like the daemon) and 2 (both cores);
6. memory: RSS of the loaded daemon against an empty one;
7. snapshot build time from SQLite and PostgreSQL (a fresh process per build), the worst
   query latency while the daemon rebuilds under load (``reload`` on the control socket
   while the load generator runs at a quarter of the maximum rate);
8. change propagation: ``policyctl`` adds a member, queries poll the Exim socket every
   10 ms until the answer changes.

Results: a table on stdout, DIR/results.json (every run) and DIR/results.md (the table).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

from . import build
from .dataset import Dataset, pg_create, pg_drop, populate
from .mix import write_mixes

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SERVER_CPU = "0"
CLIENT_CPU = "1"

TARGETS = {
    "exim_qps": 15000,
    "postfix_qps": 25000,
    "ratio_ref": 0.45,
    "half_rate_p99_ms": 2.0,
    "forkexec_ratio": 150,
    "bytes_per_membership": 120,
    "rss_mb": 250,
    "build_sqlite_s": 8.0,
    "rebuild_worst_ms": 20.0,
    "propagation_slack_s": 0.5,
}


def log(message: str) -> None:
    print(message, flush=True)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Daemon:
    """One policyd process pinned to the server CPU."""

    def __init__(self, python: Path, workdir: Path, sockdir: Path, name: str, store_url: str,
                 *, tcp_port: int | None = None, refresh: float = 2.0,
                 postfix_mode: str = "envelope", metrics: str = "", extra: str = "") -> None:
        self.name = name
        self.workdir = workdir
        self.exim = sockdir / f"{name}-exim.sock"
        self.postfix = sockdir / f"{name}-postfix.sock"
        self.control = sockdir / f"{name}-control.sock"
        self.tcp_port = tcp_port
        self.log_file = workdir / f"{name}.log"
        self.config = workdir / f"{name}.conf"
        self.refresh = refresh
        postfix_listen = f"unix:{self.postfix}:mode=666"
        if tcp_port:
            postfix_listen += f" tcp:{tcp_port}:interface=127.0.0.1"
        (workdir / f"{name}-state").mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            "# written by python -m bench\n"
            f"[store]\nbackend = native\nurl = {store_url}\nrefresh_interval = {refresh:g}\n\n"
            f"[daemon]\nstate_dir = {workdir / (name + '-state')}\n"
            f"control_socket = {self.control}\ncontrol_socket_mode = 0600\n"
            f"log_file = {self.log_file}\n\n"
            f"[exim]\nlisten = unix:{self.exim}:mode=666\n\n"
            f"[postfix]\nlisten = {postfix_listen}\nmode = {postfix_mode}\n"
            + (f"\n[metrics]\nlisten = {metrics}\n" if metrics else "") + extra)
        policyd = python.parent / "policyd"
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            ["taskset", "-c", SERVER_CPU, str(policyd), "--config", str(self.config)],
            stdout=open(workdir / f"{name}.out", "w"), stderr=subprocess.STDOUT)
        self.pid = self.proc.pid  # taskset execs policyd: same pid

    def status(self) -> dict:
        from policyd import control_client

        return control_client.status(self.control, timeout=30)

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Seconds from start until the first snapshot is loaded."""
        from policyd import control_client

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"bench: policyd ({self.name}) exited with status "
                                 f"{self.proc.returncode}; see {self.workdir / (self.name + '.out')}")
            try:
                status = control_client.status(self.control, timeout=5)
            except control_client.ControlError:
                time.sleep(0.05)
                continue
            if status.get("snapshot"):
                return time.monotonic() - self.started
            time.sleep(0.05)
        raise SystemExit(f"bench: policyd ({self.name}) did not load a snapshot in {timeout:g} s")

    def truncate_log(self) -> None:
        # The daemon appends (O_APPEND): truncating in place keeps the disk use bounded.
        try:
            os.truncate(self.log_file, 0)
        except OSError:
            pass

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.state = Path(args.state_dir).resolve()
        self.state.mkdir(parents=True, exist_ok=True)
        self.python = Path(sys.executable)
        self.results: dict = {"runs": [], "figures": {}, "environment": {}}
        self.data = (Dataset(lists=50, memberships=20_000, addresses=10_000) if args.quick
                     else Dataset())
        self.duration = args.duration
        self.warmup = 0.5
        self.stack = ExitStack()
        # Where each shape's next run starts in its request file: consecutive runs walk
        # through the file, so the daemon's caches see a stream of senders, not a replay.
        self.cursor: dict[str, int] = {}

    def advance(self, shape: str, result: dict) -> None:
        self.cursor[shape] = self.cursor.get(shape, 0) + result.get("issued", 0)

    # --- setup -----------------------------------------------------------------------------

    def prepare(self) -> None:
        started = time.monotonic()
        self.loadgen = build.loadgen(self.state)
        key = f"{self.data.lists}-{self.data.memberships}-{self.data.addresses}"
        stamp = _source_stamp("dataset.py", "mix.py") + "-" + key
        self.pristine = self.state / f"store-{key}.sqlite"
        marker = self.state / f"store-{key}.stamp"
        if not (self.pristine.exists() and marker.exists() and marker.read_text() == stamp):
            log(f"generating the store ({self.data.lists} lists, "
                f"{self.data.memberships} memberships) and the request mixes")
            for path in (self.pristine, Path(str(self.pristine) + "-wal"),
                         Path(str(self.pristine) + "-shm")):
                path.unlink(missing_ok=True)
            marker.unlink(missing_ok=True)
            self.results["populate_sqlite"] = populate(f"sqlite:///{self.pristine}", self.data,
                                                       log=log)
            self.mixes = self.state / f"mix-{key}"
            self.mixes.mkdir(exist_ok=True)
            kinds = write_mixes(self.mixes, self.data,
                                150_000 if not self.args.quick else 5000)
            (self.mixes / "kinds.json").write_text(json.dumps(kinds))
            marker.write_text(stamp)
        self.mixes = self.state / f"mix-{key}"
        self.results["mix_kinds"] = json.loads((self.mixes / "kinds.json").read_text())
        self.work = self.state / "work"
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir()
        self.store = self.work / "store.sqlite"
        shutil.copyfile(self.pristine, self.store)
        self.empty_store = self.work / "empty.sqlite"
        from policyd.store import Store

        empty = Store(f"sqlite:///{self.empty_store}")
        empty.upgrade()
        empty.close()
        self.sockdir = Path(tempfile.mkdtemp(prefix="policyd-bench-"))
        self.stack.callback(shutil.rmtree, self.sockdir, ignore_errors=True)
        # The fork-exec requests: the first 2,000 are plenty for a few hundred runs.
        lines = (self.mixes / "forkexec.txt").read_text().splitlines(keepends=True)[:2000]
        (self.work / "forkexec.txt").write_text("".join(lines))
        self.results["environment"] = {
            "python": sys.version.split()[0], "executable": sys.executable,
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "kernel": platform.release(), "load_before": os.getloadavg(),
            "dataset": asdict(self.data) | {"max_list": max(self.data.sizes),
                                            "min_list": min(self.data.sizes)},
            "duration_s": self.duration, "runs": self.args.runs,
        }
        log(f"prepared in {time.monotonic() - started:.1f} s (state in {self.state})")

    # --- load generator ---------------------------------------------------------------------

    def loadgen_cmd(self, shape: str, target: str | None, requests: Path, concurrency: int,
                    duration: float, *, rate: float = 0, timeline: float = 0,
                    cpu: str = CLIENT_CPU, extra=()) -> list[str]:
        cmd = ["taskset", "-c", cpu, str(self.loadgen), "--mode", shape,
               "--requests", str(requests), "--concurrency", str(concurrency),
               "--duration", f"{duration:g}", "--warmup", f"{self.warmup:g}",
               "--start", str(self.cursor.get(shape, 0))]
        if target:
            cmd += ["--target", target]
        if rate:
            cmd += ["--rate", f"{rate:.0f}"]
        if timeline:
            cmd += ["--timeline", f"{timeline:g}"]
        return cmd + list(extra)

    def run_load(self, label: str, shape: str, target: str, concurrency: int, *,
                 server_pid: int | None = None, rate: float = 0, duration: float | None = None,
                 requests: Path | None = None) -> dict:
        duration = duration or self.duration
        requests = requests or self.mixes / ("exim.txt" if shape == "exim" else "postfix.txt")
        cmd = self.loadgen_cmd(shape, target, requests, concurrency, duration, rate=rate)
        cpu0 = cpu_seconds(server_pid) if server_pid else None
        wall0 = time.monotonic()
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
        wall = time.monotonic() - wall0
        if out.returncode != 0 or not out.stdout.strip():
            raise SystemExit(f"bench: load generator failed: {out.stderr.strip()}")
        result = json.loads(out.stdout)
        result["label"] = label
        self.advance(shape, result)
        if server_pid:
            used = cpu_seconds(server_pid) - cpu0
            result["server_cpu_share"] = round(used / wall, 3)
            total = result["qps"] * wall
            result["server_cpu_us_per_req"] = round(used / total * 1e6, 1) if total else None
        self.results["runs"].append(result)
        return result

    # --- figures ------------------------------------------------------------------------------

    def throughput(self, daemon: Daemon, ref_targets: dict) -> None:
        """Every (shape, socket, concurrency) against policyd and the reference."""
        plan = [("exim", "unix", c) for c in (1, 8, 64)]
        plan += [("postfix", "unix", c) for c in (1, 8, 64)]
        plan += [("postfix", "tcp", c) for c in (1, 8, 64)]
        ours = {
            ("exim", "unix"): f"unix:{daemon.exim}",
            ("postfix", "unix"): f"unix:{daemon.postfix}",
            ("postfix", "tcp"): f"tcp:127.0.0.1:{daemon.tcp_port}",
        }
        collected: dict = {}
        for run in range(self.args.runs):
            log(f"throughput, run {run + 1} of {self.args.runs}")
            for shape, sock, c in plan:
                key = f"{shape}-{sock}-c{c}"
                mine = self.run_load(f"policyd {key}", shape, ours[(shape, sock)], c,
                                     server_pid=daemon.pid)
                daemon.truncate_log()
                ref = self.run_load(f"reference {key}", shape, ref_targets[(shape, sock)], c,
                                    server_pid=self.ref_pid)
                collected.setdefault(key, []).append((mine, ref))
                log(f"  {key:18} policyd {mine['qps']:>9,.0f} q/s p99 {mine['p99_ms']:6.2f} ms "
                    f"errors {mine['errors'] + mine['bad_replies']}   reference "
                    f"{ref['qps']:>9,.0f} q/s   ratio {mine['qps'] / max(ref['qps'], 1):.2f}")
        table = {}
        for key, pairs in collected.items():
            mine = [p[0] for p in pairs]
            ref = [p[1] for p in pairs]
            table[key] = {
                "qps": median(r["qps"] for r in mine),
                "p50_ms": median(r["p50_ms"] for r in mine),
                "p99_ms": median(r["p99_ms"] for r in mine),
                "p999_ms": median(r["p999_ms"] for r in mine),
                "errors": sum(r["errors"] + r["bad_replies"] for r in mine),
                "cpu_us_per_req": median(r.get("server_cpu_us_per_req") for r in mine),
                "ref_qps": median(r["qps"] for r in ref),
                "ref_p99_ms": median(r["p99_ms"] for r in ref),
                "ref_cpu_us_per_req": median(r.get("server_cpu_us_per_req") for r in ref),
                # the median of per-run ratios: each run's pair saw the same host conditions
                "ratio": median(m["qps"] / r["qps"] for m, r in pairs if r["qps"]),
                "replies": mine[-1]["replies"],
            }
        self.results["figures"]["throughput"] = table

    def profile(self, daemon: Daemon) -> None:
        """py-spy samples of the daemon under Exim and Postfix load (``--py-spy``)."""
        from . import profile

        out = {}
        for shape, target in (("exim", f"unix:{daemon.exim}"),
                              ("postfix", f"unix:{daemon.postfix}")):
            raw = self.state / f"profile-{shape}.txt"
            raw.unlink(missing_ok=True)
            cmd = self.loadgen_cmd(shape, target, self.mixes / f"{shape}.txt", 8,
                                   self.duration + 6)
            gen = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            time.sleep(self.warmup + 0.5)
            profile.record(self.args.py_spy, daemon.pid, self.duration + 4, raw)
            self.advance(shape, json.loads(gen.communicate(timeout=120)[0]))
            daemon.truncate_log()
            out[shape] = profile.summarise(raw)
            log(f"profile {shape}: " + ", ".join(
                f"{v:g}% {k}" for k, v in out[shape].get("categories", {}).items()))
        self.results["figures"]["profile"] = out

    def half_rate(self, daemon: Daemon, ref_targets: dict) -> None:
        """p99 at half of policyd's maximum rate, and the bare Twisted server's p99 at the
        same rate: the floor this machine puts under any server's tail."""
        out = {}
        table = self.results["figures"]["throughput"]
        for shape, target in (("exim", f"unix:{daemon.exim}"),
                              ("postfix", f"unix:{daemon.postfix}")):
            rate = 0.5 * table[f"{shape}-unix-c8"]["qps"]
            runs = []
            refs = []
            for _ in range(self.args.runs):
                runs.append(self.run_load(f"policyd {shape} half rate", shape, target, 8,
                                          server_pid=daemon.pid, rate=rate))
                daemon.truncate_log()
                refs.append(self.run_load(f"reference {shape} half rate", shape,
                                          ref_targets[(shape, "unix")], 8,
                                          server_pid=self.ref_pid, rate=rate))
            out[shape] = {
                "ref_p50_ms": median(r["p50_ms"] for r in refs),
                "ref_p99_ms": median(r["p99_ms"] for r in refs),
                "rate": rate,
                "achieved_qps": median(r["qps"] for r in runs),
                "p50_ms": median(r["p50_ms"] for r in runs),
                "p99_ms": median(r["p99_ms"] for r in runs),
                "p999_ms": median(r["p999_ms"] for r in runs),
                "errors": sum(r["errors"] + r["bad_replies"] for r in runs),
            }
            log(f"half rate {shape}: {rate:,.0f} q/s -> p50 {out[shape]['p50_ms']:.3f} ms, "
                f"p99 {out[shape]['p99_ms']:.3f} ms, p99.9 {out[shape]['p999_ms']:.3f} ms; "
                f"bare Twisted at that rate: p99 {out[shape]['ref_p99_ms']:.3f} ms")
        self.results["figures"]["half_rate"] = out

    def forkexec(self) -> None:
        interpreter = Path("/usr/bin/python3")
        if not interpreter.exists():
            interpreter = self.python
        script = HERE / "oldcheck.py"
        out = {"interpreter": str(interpreter)}
        for concurrency, cpus in ((1, SERVER_CPU), (2, f"{SERVER_CPU},{CLIENT_CPU}")):
            runs = []
            for _ in range(self.args.runs):
                cmd = self.loadgen_cmd("exec", None, self.work / "forkexec.txt", concurrency,
                                       max(2.0, self.duration), cpu=cpus,
                                       extra=["--", str(interpreter), str(script),
                                              str(self.store)])
                result = json.loads(subprocess.run(cmd, capture_output=True, text=True,
                                                   timeout=120, check=True).stdout)
                result["label"] = f"fork-exec c{concurrency}"
                self.results["runs"].append(result)
                runs.append(result)
            out[f"c{concurrency}"] = {"qps": median(r["qps"] for r in runs),
                                      "p50_ms": median(r["p50_ms"] for r in runs),
                                      "p99_ms": median(r["p99_ms"] for r in runs),
                                      "errors": sum(r["errors"] for r in runs),
                                      "replies": runs[-1]["replies"]}
            log(f"fork-exec c={concurrency}: {out[f'c{concurrency}']['qps']:.1f} q/s, "
                f"p50 {out[f'c{concurrency}']['p50_ms']:.1f} ms")
        self.results["figures"]["forkexec"] = out

    def empty_daemon_rss(self) -> int:
        daemon = Daemon(self.python, self.work, self.sockdir, "empty",
                        f"sqlite:///{self.empty_store}")
        try:
            daemon.wait_ready()
            time.sleep(1.0)
            # a few queries so that the code paths are imported and warm, as in the big one
            self.run_load("empty daemon warm-up", "exim", f"unix:{daemon.exim}", 1,
                          duration=0.5)
            return proc_status(daemon.pid)["VmRSS"]
        finally:
            daemon.stop()

    def snapshot_builds(self) -> None:
        out = {"sqlite": [], "postgresql": []}
        url = f"sqlite:///{self.store}"
        for _ in range(self.args.runs):
            out["sqlite"].append(self._build_once(url))
        each = ", ".join(f"{r['build_s']:.2f}" for r in out["sqlite"])
        log(f"snapshot build from SQLite: {median(r['build_s'] for r in out['sqlite']):.2f} s "
            f"(runs: {each})")
        if not self.args.skip_postgresql:
            name = f"policyd_bench_{os.getpid()}"
            try:
                pg_url = pg_create(name)
            except Exception as error:  # noqa: BLE001 - reported, not fatal
                out["postgresql_error"] = str(error).strip().splitlines()[0]
                log(f"PostgreSQL unavailable: {out['postgresql_error']}")
            else:
                try:
                    out["postgresql_populate"] = populate(pg_url, self.data, log=log)
                    for _ in range(self.args.runs):
                        out["postgresql"].append(self._build_once(pg_url))
                    log("snapshot build from PostgreSQL: "
                        f"{median(r['build_s'] for r in out['postgresql']):.2f} s")
                finally:
                    pg_drop(name)
        self.results["figures"]["snapshot_build"] = {
            "sqlite_s": median(r["build_s"] for r in out["sqlite"]),
            "postgresql_s": median(r["build_s"] for r in out["postgresql"]),
            "runs": out,
        }

    def stages(self) -> None:
        """Microseconds per request in each stage of the daemon's own code, no sockets."""
        out = subprocess.run(
            ["taskset", "-c", SERVER_CPU, str(self.python), "-m", "bench.stages",
             f"sqlite:///{self.store}", str(self.mixes / "exim.txt"),
             str(self.mixes / "postfix.txt"), "20000"],
            capture_output=True, text=True, cwd=REPO, timeout=300)
        if out.returncode != 0:
            log(f"stages failed: {out.stderr.strip()[-1000:]}")
            return
        stages = json.loads(out.stdout)
        self.results["figures"]["stages"] = stages
        log("stages (µs per request, no sockets): " + ", ".join(
            f"{k[:-3]} {v:g}" for k, v in stages.items() if k.endswith("_us")))

    def _build_once(self, url: str) -> dict:
        out = subprocess.run(["taskset", "-c", SERVER_CPU, str(self.python), "-m",
                              "bench.snapbuild", url], capture_output=True, text=True,
                             cwd=REPO, timeout=300)
        if out.returncode != 0:
            raise SystemExit(f"bench: snapshot build failed: {out.stderr.strip()[-2000:]}")
        return json.loads(out.stdout)

    def rebuild_under_load(self, daemon: Daemon) -> None:
        from policyd import control_client

        table = self.results["figures"]["throughput"]
        rate = 0.25 * table["postfix-unix-c8"]["qps"]
        runs = []
        for _ in range(self.args.runs):
            cmd = self.loadgen_cmd("postfix", f"unix:{daemon.postfix}",
                                   self.mixes / "postfix.txt", 8, 120, rate=rate,
                                   timeline=0.1)
            gen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
            try:
                time.sleep(self.warmup + 1.0)
                t0 = time.monotonic()
                answer = control_client.reload(daemon.control, timeout=120)
                reload_s = time.monotonic() - t0
                time.sleep(0.5)
            finally:
                gen.send_signal(signal.SIGTERM)
                stdout, stderr = gen.communicate(timeout=60)
            result = json.loads(stdout)
            self.advance("postfix", result)
            result["label"] = "policyd postfix rebuild under load"
            result["reload_s"] = reload_s
            result["reloaded"] = answer.get("reloaded")
            # worst latency among the queries that completed while the rebuild ran
            step = result["timeline_step"]
            first = int((1.0) / step)
            last = int((1.0 + reload_s) / step) + 1
            window = result["timeline_max_ms"][first:last + 1]
            result["worst_during_rebuild_ms"] = max(window) if window else None
            if window and os.environ.get("BENCH_SHOW_WINDOW"):
                log("  timeline (max ms per 0.1 s): " + " ".join(f"{v:.0f}" for v in window))
            self.results["runs"].append(result)
            runs.append(result)
            daemon.truncate_log()
            log(f"rebuild under load ({rate:,.0f} q/s): reload took {reload_s:.2f} s, worst "
                f"query {result['worst_during_rebuild_ms']:.1f} ms, max over the run "
                f"{result['max_ms']:.1f} ms, errors {result['errors'] + result['bad_replies']}")
        self.results["figures"]["rebuild"] = {
            "rate": rate,
            "reload_s": median(r["reload_s"] for r in runs),
            "worst_ms": median(r["worst_during_rebuild_ms"] for r in runs),
            "worst_ms_all_runs": max(r["worst_during_rebuild_ms"] or 0 for r in runs),
            "p99_ms": median(r["p99_ms"] for r in runs),
            "errors": sum(r["errors"] + r["bad_replies"] for r in runs),
        }

    def propagation(self, daemon: Daemon) -> None:
        list_index = next(i for i in range(self.data.lists)
                          if self.data.nonmember_action(i) == 1)  # reject
        list_address = self.data.posting_address(list_index)
        policyctl = self.python.parent / "policyctl"
        probe_cli = subprocess.run([str(policyctl), "--help"], capture_output=True, text=True)
        via = "policyctl"
        if probe_cli.returncode != 0:
            # policyctl not there yet: the same store call it makes, in a fresh process
            via = "policyd.store API (policyctl unavailable)"
            log(f"propagation: policyctl does not run ({probe_cli.stderr.strip()[-200:]}); "
                "adding members with the store API instead")
        runs = []
        for run in range(self.args.runs):
            probe = f"probe{run}-{os.getpid()}@propagation.example"
            line = _exim_request(list_address, probe)
            before = _exim_ask(daemon.exim, line)
            t_start = time.monotonic()
            if via == "policyctl":
                cmd = [str(policyctl), "--config", str(daemon.config), "member", "add",
                       list_address, probe]
            else:
                cmd = [str(self.python), "-c", _ADD_MEMBER, str(self.store), list_address,
                       probe]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            t_done = time.monotonic()
            if done.returncode != 0:
                raise SystemExit(f"bench: {' '.join(cmd)} failed: "
                                 f"{(done.stderr or done.stdout).strip()}")
            seen = None
            polls = 0
            while time.monotonic() - t_done < 60:
                polls += 1
                if _exim_ask(daemon.exim, line).startswith("ACCEPT"):
                    seen = time.monotonic()
                    break
                time.sleep(0.01)
            result = {
                "label": "propagation", "before": before,
                "policyctl_s": t_done - t_start,
                "seen_after_s": None if seen is None else seen - t_done,
                "seen_after_start_s": None if seen is None else seen - t_start,
                "polls": polls,
            }
            runs.append(result)
            self.results["runs"].append(result)
            log(f"propagation: policyctl took {result['policyctl_s']:.2f} s, change seen "
                f"{result['seen_after_s']:.2f} s after it returned (answer before: {before!r})")
            time.sleep(0.5)
        self.results["figures"]["propagation"] = {
            "refresh_interval": daemon.refresh,
            "via": via,
            "seen_after_s": median(r["seen_after_s"] for r in runs),
            "worst_s": max((r["seen_after_s"] or 1e9) for r in runs),
            "policyctl_s": median(r["policyctl_s"] for r in runs),
        }

    # --- the whole run ---------------------------------------------------------------------------

    def run(self) -> int:
        wall = time.monotonic()
        with self.stack:
            self.prepare()
            figures = self.results["figures"]

            log("memory: empty daemon")
            rss_empty = self.empty_daemon_rss()

            port = free_port()
            daemon = Daemon(self.python, self.work, self.sockdir, "policyd",
                            f"sqlite:///{self.store}", tcp_port=port)
            self.stack.callback(daemon.stop)
            startup = daemon.wait_ready()
            time.sleep(1.0)
            rss_loaded = proc_status(daemon.pid)["VmRSS"]
            log(f"policyd ready in {startup:.1f} s, RSS {rss_loaded / 2**20:.0f} MiB "
                f"(empty daemon {rss_empty / 2**20:.0f} MiB)")

            ref_port = free_port()
            ref_exim = self.sockdir / "ref-exim.sock"
            ref_postfix = self.sockdir / "ref-postfix.sock"
            ref = subprocess.Popen(
                ["taskset", "-c", SERVER_CPU, str(self.python), "-m", "bench.refserver",
                 "--exim", f"unix:{ref_exim}", "--postfix", f"unix:{ref_postfix}",
                 "--postfix", f"tcp:{ref_port}:interface=127.0.0.1"],
                stdout=subprocess.PIPE, text=True, cwd=REPO)
            self.stack.callback(_stop, ref)
            if ref.stdout.readline().strip() != "ready":
                raise SystemExit("bench: the reference server did not start")
            self.ref_pid = ref.pid
            ref_targets = {("exim", "unix"): f"unix:{ref_exim}",
                           ("postfix", "unix"): f"unix:{ref_postfix}",
                           ("postfix", "tcp"): f"tcp:127.0.0.1:{ref_port}"}

            self.throughput(daemon, ref_targets)
            self.half_rate(daemon, ref_targets)
            _stop(ref)
            if self.args.py_spy:
                self.profile(daemon)
            rss_after = proc_status(daemon.pid)["VmRSS"]
            memberships = self.data.memberships
            figures["memory"] = {
                "rss_empty": rss_empty, "rss_loaded": rss_loaded, "rss_after_load": rss_after,
                "bytes_per_membership": (rss_after - rss_empty) / memberships,
                "bytes_per_membership_at_start": (rss_loaded - rss_empty) / memberships,
                "startup_s": startup,
            }
            log(f"memory: {rss_after / 2**20:.0f} MiB after the load runs, "
                f"{figures['memory']['bytes_per_membership']:.0f} B per membership")

            self.rebuild_under_load(daemon)
            figures["memory"]["peak_rss_after_rebuilds"] = proc_status(daemon.pid)["VmHWM"]
            self.propagation(daemon)
            daemon.stop()

            self.forkexec()
            self.snapshot_builds()
            self.stages()
        self.results["elapsed_s"] = time.monotonic() - wall
        self.results["environment"]["load_after"] = os.getloadavg()
        rows = summarise(self.results)
        text = render(rows, self.results)
        print()
        print(text)
        (self.state / "results.json").write_text(json.dumps(self.results, indent=1))
        (self.state / "results.md").write_text(text + "\n")
        log(f"\nresults: {self.state / 'results.json'} and {self.state / 'results.md'}; "
            f"whole run {self.results['elapsed_s']:.0f} s")
        return 0


# --- helpers ------------------------------------------------------------------------------------


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _source_stamp(*names: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name in names:
        digest.update((HERE / name).read_bytes())
    return digest.hexdigest()[:16]


_ADD_MEMBER = """
import sys
from policyd.store import Store, queries as q
store = Store('sqlite:///' + sys.argv[1])
with store.write() as session:
    q.add_members(session, q.find_list(session, sys.argv[2]), q.entries_from([sys.argv[3]], None))
"""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _exim_request(list_address: str, sender: str) -> bytes:
    return (f"POLICYD/1 list={list_address} sender={_b64(sender)} "
            f"from={_b64(sender)}\n").encode()


def _exim_ask(path: Path, line: bytes) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(line)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).decode()


def _fmt(value, spec=",.0f", suffix="") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def summarise(results: dict) -> list[tuple]:
    """(figure, measured, target, PASS/FAIL) rows for every target of issue 6."""
    f = results["figures"]
    t = TARGETS
    rows = []
    tp = f.get("throughput", {})

    def verdict(ok):
        return "n/a" if ok is None else ("PASS" if ok else "FAIL")

    def both(first, first_name, second, second_name):
        if first and second:
            return "PASS"
        if not first and not second:
            return "FAIL"
        return f"FAIL ({first_name if not first else second_name}), PASS ({first_name if first else second_name})"

    for key, name, floor in (("exim-unix-c8", "Exim, connection per query, concurrency 8",
                              t["exim_qps"]),
                             ("postfix-unix-c8", "Postfix, 8 persistent connections (Unix)",
                              t["postfix_qps"])):
        row = tp.get(key)
        if row:
            clean = row["errors"] == 0
            rows.append((name, f"{row['qps']:,.0f} q/s = {row['ratio']:.2f} x bare Twisted "
                         f"({row['ref_qps']:,.0f})",
                         f">= {floor:,} q/s and >= {t['ratio_ref']} x",
                         both(row["qps"] >= floor and clean, "q/s",
                              row["ratio"] >= t["ratio_ref"] and clean, "ratio")))
    hr = f.get("half_rate", {})
    for shape in ("exim", "postfix"):
        row = hr.get(shape)
        if row:
            rows.append((f"{shape.title()} p99 at half the maximum rate "
                         f"({row['rate']:,.0f} q/s)",
                         f"{row['p99_ms']:.2f} ms (p50 {row['p50_ms']:.2f}; bare Twisted at "
                         f"the same rate: p99 {row['ref_p99_ms']:.2f})",
                         f"<= {t['half_rate_p99_ms']} ms",
                         verdict(row["p99_ms"] <= t["half_rate_p99_ms"] and row["errors"] == 0)))
    fe = f.get("forkexec", {})
    if fe and tp.get("exim-unix-c8"):
        ours = tp["exim-unix-c8"]["qps"]
        base = fe["c1"]["qps"]
        rows.append(("Against the fork-exec baseline (Exim c=8 vs one caller)",
                     f"{ours / base:,.0f} x ({base:.0f} q/s; {ours / fe['c2']['qps']:,.0f} x "
                     f"its two-caller {fe['c2']['qps']:.0f} q/s)",
                     f">= {t['forkexec_ratio']} x", verdict(ours / base >= t["forkexec_ratio"])))
    mem = f.get("memory")
    if mem:
        bpm = mem["bytes_per_membership"]
        rss = mem["rss_after_load"] / 1e6
        rows.append(("Memory, 1,000,000 memberships",
                     f"{bpm:.0f} B per membership, RSS {rss:.0f} MB "
                     f"(empty {mem['rss_empty'] / 1e6:.0f} MB; peak "
                     f"{_fmt((mem.get('peak_rss_after_rebuilds') or 0) / 1e6, '.0f')} MB "
                     "across full rebuilds)",
                     f"<= {t['bytes_per_membership']} B and <= {t['rss_mb']} MB",
                     both(bpm <= t["bytes_per_membership"], "B per membership",
                          rss <= t["rss_mb"], "RSS")))
    sb = f.get("snapshot_build")
    rb = f.get("rebuild")
    if sb:
        rows.append(("Snapshot build from SQLite", _fmt(sb["sqlite_s"], ".2f", " s"),
                     f"<= {t['build_sqlite_s']:g} s",
                     verdict(sb["sqlite_s"] is not None and sb["sqlite_s"] <= t["build_sqlite_s"])))
        rows.append(("Snapshot build from PostgreSQL", _fmt(sb["postgresql_s"], ".2f", " s"),
                     "(no target)", ""))
    if rb:
        rows.append((f"Worst query while the daemon rebuilds ({rb['rate']:,.0f} q/s load)",
                     f"{rb['worst_ms']:.1f} ms (worst run {rb['worst_ms_all_runs']:.1f} ms; "
                     f"rebuild {rb['reload_s']:.1f} s)",
                     f"<= {t['rebuild_worst_ms']:g} ms",
                     verdict(rb["worst_ms_all_runs"] <= t["rebuild_worst_ms"]
                             and rb["errors"] == 0)))
    pr = f.get("propagation")
    if pr:
        limit = pr["refresh_interval"] + t["propagation_slack_s"]
        rows.append(("Change propagation after policyctl",
                     f"{_fmt(pr['seen_after_s'], '.2f', ' s')} (worst {pr['worst_s']:.2f} s)",
                     f"<= {limit:g} s", verdict(pr["worst_s"] <= limit)))
    return rows


def render(rows: list[tuple], results: dict) -> str:
    out = ["| figure | measured (median) | target | result |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    tp = results["figures"].get("throughput")
    if tp:
        out += ["", "| shape | socket | conc. | policyd q/s | p50 ms | p99 ms | p99.9 ms | "
                "µs CPU/req | bare Twisted q/s | ratio | errors |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for key, row in tp.items():
            shape, sock, c = key.split("-")
            out.append(f"| {shape} | {sock} | {c[1:]} | {row['qps']:,.0f} | {row['p50_ms']:.3f} | "
                       f"{row['p99_ms']:.3f} | {row['p999_ms']:.3f} | "
                       f"{_fmt(row['cpu_us_per_req'], '.0f')} | {row['ref_qps']:,.0f} | "
                       f"{row['ratio']:.2f} | {row['errors']} |")
    fe = results["figures"].get("forkexec")
    if fe:
        out += ["", f"Fork-exec baseline ({fe['interpreter']} bench/oldcheck.py per query): "
                f"{fe['c1']['qps']:.1f} q/s with one caller (p50 {fe['c1']['p50_ms']:.1f} ms), "
                f"{fe['c2']['qps']:.1f} q/s with two."]
    st = results["figures"].get("stages")
    if st:
        out += ["", "Where a request's CPU goes in policyd's own code (µs per request, "
                "in-process, no sockets): "
                f"Exim parse {st['exim_parse_us']:g}, decide {st['exim_decide_warm_us']:g} "
                f"(cold header caches {st['exim_decide_cold_us']:g}), reply+render "
                f"{st['exim_reply_us'] + st['exim_render_us']:.2f}, log line "
                f"{st['log_line_us']:g}; Postfix parse {st['postfix_parse_us']:g}, decide "
                f"{st['postfix_decide_warm_us']:g}, reply+render "
                f"{st['postfix_reply_render_us']:g}."]
    prof = results["figures"].get("profile")
    if prof:
        for shape, p in prof.items():
            if p.get("categories"):
                out += ["", f"py-spy, {shape} at concurrency 8 ({p['samples']} samples): "
                        + ", ".join(f"{k} {v:g}%" for k, v in p["categories"].items()) + "."]
    env = results["environment"]
    out += ["", f"Python {env.get('python')} ({env.get('executable')}), {env.get('cpus')} CPUs, "
            f"server on CPU {SERVER_CPU}, load generator on CPU {CLIENT_CPU}; "
            f"{env.get('runs')} runs of {env.get('duration_s')} s per figure; load average "
            f"before {', '.join(f'{x:.2f}' for x in env.get('load_before', ()))}."]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench",
                                     description="policyd performance figures (issue 6)")
    parser.add_argument("--state-dir", required=True,
                        help="where the store, request mixes, logs and results go")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (default 3)")
    parser.add_argument("--duration", type=float, default=2.5,
                        help="seconds measured per run (default 2.5, after 0.5 s warm-up)")
    parser.add_argument("--quick", action="store_true",
                        help="a small store and one short run: checks the harness, not speed")
    parser.add_argument("--skip-postgresql", action="store_true",
                        help="no PostgreSQL snapshot-build figure")
    parser.add_argument("--py-spy", metavar="PATH",
                        help="a py-spy binary: also sample the daemon under load")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs = 1
        args.duration = min(args.duration, 1.0)
    if (os.cpu_count() or 1) < 2:
        log("bench: warning: one CPU only, server and load generator will share it")
    os.chdir(REPO)
    return Bench(args).run()
