"""``python -m bench --state-dir DIR`` (``make bench``): every performance target, one verdict.

What one run does (about 15 minutes on a quiet 2-core machine, plus a few for the first
generation of the stores; ``--quick`` checks the
harness in a few minutes on small stores, its figures mean nothing):

1. builds the C load generator; generates the stores (1,000 lists / 1,000,000
   memberships; the same 1,000 lists with 10,000 memberships; postfwd's job: 100 lists x
   1,000 members) and their request mixes (kept in DIR, reused while their generator is
   unchanged; every run works on fresh copies);
2. starts, all pinned to CPU 0 (the load generator runs on CPU 1): policyd on the 1M store
   in ``[postfix] mode = envelope`` (the membership is looked up: the headline), the same
   in ``safe`` mode, policyd on the 10k store, the constant-answer bare Twisted refserver
   and the bare Twisted refserver doing the same membership lookup
   (``bench.refserver --lookup``); while one of them is measured the others are paused
   (SIGSTOP), so that their periodic work (an idle daemon's store check every 2 s) does
   not stall the one measured;
3. each suite starts by printing the machine's load average; the suites:

   * closed loop: Exim (connection per query) and Postfix (persistent connections, Unix
     and TCP) at concurrency 1, 8, 64, every server interleaved run by run so that a
     disturbance of the host hits both sides of a ratio; medians of ``--runs``;
   * open loop: Poisson arrivals at 25 %, 50 % and 75 % of policyd's closed-loop maximum
     (c=8), both protocols, latency counted from each request's scheduled send time (no
     coordinated omission), policyd and the same-lookup reference on the same schedule;
     each run also records how long the server's reactor thread was runnable but kept
     off the CPU (``/proc/PID/schedstat``) and the host's steal time: a disturbed run
     shows there;
   * scale: the same daemon on 10k and on 1M memberships (ratios from the closed loop);
   * metrics: CPU per request at a fixed rate, ``[metrics] listen`` on against off
     (when policyd's config has the key);
   * the peer: postfwd on the membership job (``bench.peer``; installed with apt-get when
     root and missing, else SKIP with the reason) against policyd on the same job;
   * Exim with the message (issue 16): closed loop c=8 on the DATA ACL's whole request
     (``bench.headermix``: a 2-4 KB header block, a short body, size and client), policyd
     against the same-lookup refserver, beside the closed loop's figures without it;
   * moderation (issue 17): CPU per request at a fixed rate with ``smtp_moderation =
     greylist`` on every list of a copy of the 10k store, against the 10k daemon; lookups
     only (``bench.modprime`` remembers, beforehand, every sender moderation looks at);
   * memory, rebuild under load, change propagation, the fork-exec baseline, snapshot
     builds, propagation on PostgreSQL (issue 12, ``bench.propagation``: NOTIFY to 3
     daemons, then the database load of 3 idle polling ones), per-stage CPU
     (in-process), codec parse time at 1, 8 and 64 KB (issue 13, ``bench.codectime``),
     and the Mailman 3 database suite (``bench.mailman3``, with ``--mailman-python``);

4. prints one PASS/FAIL table of every target (``bench.verdict``), then the detail
   tables, and exits 0 only when every target is met: 1 when one is missed, 2 when the
   harness itself failed.

Results: DIR/results.json (every run) and DIR/results.md (the tables).
``--timeline`` runs the 1M daemon under ``bench.timeline`` and records its reactor turns
during the open-loop runs at 75 % (``figures.timeline`` in results.json): what the tail
investigation of issue 14 used.
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
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path

from . import build
from .dataset import Dataset, pg_create, pg_drop, populate
from .mix import write_mixes
from .verdict import Measurement, exit_status, render as render_verdict, verdict

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SERVER_CPU = "0"
CLIENT_CPU = "1"
OPEN_LOOP_FRACTIONS = (0.25, 0.5, 0.75)
OPEN_LOOP_SLOTS = 32


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


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process ``pid``, all its threads."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _store_events(daemon) -> dict | None:
    """A policyd daemon's snapshot loads so far and how long ago its last verification
    build worked (``policyctl status``), or None (not a daemon, or no answer)."""
    if daemon is None:
        return None
    try:
        store = daemon.status()["store"]
    except Exception:
        return None
    verification = store.get("verification") or {}
    return {"loads": store.get("loads", 0),
            "verified_age": verification.get("last_verified_age")}


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def run_delay(pid: int) -> float:
    """Seconds the process's main thread (policyd's reactor thread) has been runnable but
    not running: another process had its CPU."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def steal_seconds(cpu: str = SERVER_CPU) -> float:
    """The hypervisor's steal time of ``cpu`` so far (0 where not reported)."""
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith(f"cpu{cpu} "):
                    return int(line.split()[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        pass
    return 0.0


def ram_directory() -> str | None:
    """A directory on a RAM file system (tmpfs) writable here, else ``None``."""
    try:
        with open("/proc/mounts") as f:
            mounts = {fields[1]: fields[2] for fields in (line.split() for line in f)
                      if len(fields) > 2}
    except OSError:
        return None
    for path in ("/dev/shm", "/run/shm", "/tmp"):
        if mounts.get(path) == "tmpfs" and os.access(path, os.W_OK | os.X_OK):
            return path
    return None


def metrics_configurable() -> bool:
    """``[metrics] listen`` is a key of policyd's configuration (issue 14 measures its cost
    once it exists)."""
    try:
        from policyd.config import parse

        parse("[metrics]\nlisten = tcp:9163:interface=127.0.0.1\n")
        return True
    except Exception:  # noqa: BLE001 - an unknown section or key: not there yet
        return False


class Daemon:
    """One policyd process pinned to the server CPU."""

    def __init__(self, python: Path, workdir: Path, sockdir: Path, name: str, store_url: str,
                 *, tcp_port: int | None = None, refresh: float = 2.0,
                 postfix_mode: str = "envelope", metrics: str = "", extra: str = "",
                 daemon_extra: str = "", timeline: Path | None = None,
                 log_dir: Path | None = None, command: list[str] | None = None) -> None:
        self.name = name
        self.workdir = workdir
        self.exim = sockdir / f"{name}-exim.sock"
        self.postfix = sockdir / f"{name}-postfix.sock"
        self.control = sockdir / f"{name}-control.sock"
        self.tcp_port = tcp_port
        self.log_file = (log_dir or workdir) / f"{name}.log"
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
            f"log_file = {self.log_file}\n{daemon_extra}\n"
            f"[exim]\nlisten = unix:{self.exim}:mode=666\n\n"
            f"[postfix]\nlisten = {postfix_listen}\nmode = {postfix_mode}\n"
            + (f"\n[metrics]\nlisten = {metrics}\n" if metrics else "") + extra)
        self.postfix_mode = postfix_mode
        self.timeline = timeline
        # ``timeline``: the daemon runs under ``bench.timeline`` (probes around its reactor
        # turns, GC and timed calls; recorded between SIGUSR1 and SIGUSR2, into that file)
        # ``command``: what runs instead of ``policyd`` (``bench.floor``'s variants).
        if command is None:
            command = ([str(python), "-m", "bench.timeline", str(timeline), "--"] if timeline
                       else [str(python.parent / "policyd")])
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            ["taskset", "-c", SERVER_CPU, *command, "--config", str(self.config)],
            stdout=open(workdir / f"{name}.out", "w"), stderr=subprocess.STDOUT, cwd=REPO)
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
            self.proc.send_signal(signal.SIGCONT)  # paused by ``others_paused``?
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
        self.results: dict = {"runs": [], "figures": {}, "environment": {}, "suites": []}
        self.measurements: dict[str, Measurement] = {}
        if args.quick:
            self.data = Dataset(lists=50, memberships=20_000, addresses=10_000)
            self.small = Dataset(lists=50, memberships=4_000, addresses=2_500)
        else:
            self.data = Dataset()
            self.small = Dataset(lists=1000, memberships=10_000, addresses=5_000)
        self.duration = args.duration
        self.open_duration = args.open_duration
        self.warmup = 0.5
        self.stack = ExitStack()
        # Where each request file's next run starts: consecutive runs walk through the
        # file, so the daemon's caches see a stream of senders, not a replay.
        self.cursor: dict[str, int] = {}
        self.servers: dict[str, dict] = {}

    # --- bookkeeping -----------------------------------------------------------------------

    def suite(self, name: str) -> None:
        load = os.getloadavg()
        log(f"\n== {name} == load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
            f"(1, 5, 15 min; {os.cpu_count()} CPUs)")
        self.results["suites"].append({"suite": name, "load_average": load,
                                       "started": time.time()})

    def measure(self, key: str, value=None, detail: str = "", errors: int = 0,
                skip: str | None = None) -> None:
        self.measurements[key] = Measurement(value, detail, errors, skip)

    def guarded(self, keys: tuple[str, ...], suite) -> None:
        """Run ``suite``; if it crashes, its targets FAIL with the error (the other suites
        and the verdict still run)."""
        try:
            suite()
        except Exception as error:  # noqa: BLE001 - reported in the table
            import traceback

            traceback.print_exc()
            for key in keys:
                if key not in self.measurements:
                    self.measure(key, None, f"suite failed: {type(error).__name__}: "
                                 f"{str(error)[:200]}")

    @contextmanager
    def others_paused(self, pid: int | None):
        """Every other server on the server CPU stopped (SIGSTOP) while ``pid`` is
        measured, continued after.  An idle daemon still checks its store every
        ``refresh_interval`` (a count over the memberships: 3-7 ms of CPU at 1M every
        2 s); on the one server CPU those bursts stall whichever server is being measured,
        and at 75 % of its maximum each stall leaves a queue several times its length
        (issue 14's tail investigation, server and load generator at real-time priority
        to keep the rest of the machine out: policyd's Postfix p99 at 75 % was 5.0-5.5 ms
        with the other daemons running, 1.5-3.7 ms with them paused).  ``--no-pause``: leave
        them running."""
        if pid is None or self.args.no_pause:
            yield
            return
        paused = [s["pid"] for s in self.servers.values() if s["pid"] != pid]
        try:
            for other in paused:
                try:
                    os.kill(other, signal.SIGSTOP)
                except ProcessLookupError:
                    pass
            yield
        finally:
            for other in paused:
                try:
                    os.kill(other, signal.SIGCONT)
                except ProcessLookupError:
                    pass

    def _cursor_key(self, shape: str, requests: Path) -> str:
        default = self.mixes / ("exim.txt" if shape == "exim" else "postfix.txt")
        return shape if Path(requests) == default else str(requests)

    def advance(self, shape: str, result: dict, requests: Path | None = None) -> None:
        key = shape if requests is None else self._cursor_key(shape, requests)
        self.cursor[key] = self.cursor.get(key, 0) + result.get("issued", 0)

    # --- setup -----------------------------------------------------------------------------

    @classmethod
    def alternating(cls, state: Path, rounds: int, duration: float) -> "Bench":
        """A harness for the tools that alternate servers on the 10k store in rounds
        (``bench.ab``, ``bench.floor``); ``small_workload()`` then makes what they load."""
        return cls(argparse.Namespace(state_dir=str(state), quick=False, runs=rounds,
                                      duration=duration, open_duration=5.0, no_pause=False))

    def small_workload(self) -> Path:
        """The load generator and the 10k store's request mixes (made once, then reused);
        the path of the pristine 10k store."""
        self.loadgen = build.loadgen(self.state)
        pristine, self.mixes = self._dataset(self.small, 60_000)
        return pristine

    def _dataset(self, data: Dataset, count: int) -> tuple[Path, Path]:
        """(pristine store, mix directory) for ``data``, generated unless up to date."""
        key = f"{data.lists}-{data.memberships}-{data.addresses}"
        stamp = _source_stamp("dataset.py", "mix.py") + "-" + key
        pristine = self.state / f"store-{key}.sqlite"
        marker = self.state / f"store-{key}.stamp"
        mixes = self.state / f"mix-{key}"
        if not (pristine.exists() and marker.exists() and marker.read_text() == stamp):
            log(f"generating the store ({data.lists} lists, {data.memberships} memberships) "
                "and its request mixes")
            for path in (pristine, Path(str(pristine) + "-wal"), Path(str(pristine) + "-shm")):
                path.unlink(missing_ok=True)
            marker.unlink(missing_ok=True)
            self.results.setdefault("populate", {})[key] = populate(
                f"sqlite:///{pristine}", data, log=log)
            mixes.mkdir(exist_ok=True)
            kinds = write_mixes(mixes, data, count)
            (mixes / "kinds.json").write_text(json.dumps(kinds))
            marker.write_text(stamp)
        return pristine, mixes

    def _header_mix(self, data: Dataset, mixes: Path, count: int) -> Path:
        """The Exim requests with the message (``bench.headermix``) beside ``mixes``'
        exim.txt: generated unless up to date."""
        from .headermix import write_header_mix

        path = mixes / "exim-headers.txt"
        marker = mixes / "exim-headers.stamp"
        stamp = _source_stamp("dataset.py", "mix.py", "headermix.py") + f"-{count}"
        if not (path.exists() and marker.exists() and marker.read_text() == stamp):
            log(f"generating {count:,} Exim requests with a header block ({data.lists} "
                "lists)")
            figures = write_header_mix(path, data, count)
            path.with_suffix(".json").write_text(json.dumps(figures))
            marker.write_text(stamp)
        return path

    def _job(self) -> None:
        """postfwd's membership job: store and requests (``bench.peer``)."""
        from . import peer

        job = peer.MembershipJob()
        key = f"job-{job.lists}x{peer.MEMBERS}"
        stamp = _source_stamp("dataset.py", "mix.py", "peer.py") + "-" + key
        self.job = job
        self.job_pristine = self.state / f"store-{key}.sqlite"
        self.job_requests = self.state / f"requests-{key}.txt"
        marker = self.state / f"store-{key}.stamp"
        if not (self.job_pristine.exists() and marker.exists()
                and marker.read_text() == stamp):
            log("generating postfwd's membership job (100 lists x 1,000 members)")
            self.job_pristine.unlink(missing_ok=True)
            peer.make_store(f"sqlite:///{self.job_pristine}", job, log=log)
            peer.write_requests(self.job_requests, job, 20_000)
            marker.write_text(stamp)

    def prepare(self) -> None:
        started = time.monotonic()
        self.loadgen = build.loadgen(self.state)
        count = 5000 if self.args.quick else 150_000
        self.pristine, self.mixes = self._dataset(self.data, count)
        self.small_pristine, self.small_mixes = self._dataset(self.small, min(count, 60_000))
        self._job()
        self.results["mix_kinds"] = json.loads((self.mixes / "kinds.json").read_text())
        header_count = 2000 if self.args.quick else 20_000
        self.header_mix = self._header_mix(self.data, self.mixes, header_count)
        self.small_header_mix = self._header_mix(self.small, self.small_mixes, header_count)
        self.results["header_mix"] = json.loads(
            self.header_mix.with_suffix(".json").read_text())
        self.work = self.state / "work"
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir()
        self.store = self.work / "store.sqlite"
        shutil.copyfile(self.pristine, self.store)
        self.small_store = self.work / "small.sqlite"
        shutil.copyfile(self.small_pristine, self.small_store)
        self.job_store = self.work / "job.sqlite"
        shutil.copyfile(self.job_pristine, self.job_store)
        self.empty_store = self.work / "empty.sqlite"
        from policyd.store import Store

        empty = Store(f"sqlite:///{self.empty_store}")
        empty.upgrade()
        empty.close()
        self.sockdir = Path(tempfile.mkdtemp(prefix="policyd-bench-"))
        self.stack.callback(shutil.rmtree, self.sockdir, ignore_errors=True)
        # The daemons' logs (a line per decision) go to a RAM file system where there is
        # one: on a VM, the disk's writeback of a few MB/s stalls every process now and
        # then for tens of milliseconds, the bare Twisted references (which log nothing)
        # included when something else writes (bench/README.md, "The open-loop tail").
        # A bench of policyd, not of the disk; the log lines are still written in full.
        ram = ram_directory()
        self.logdir = Path(tempfile.mkdtemp(prefix="policyd-bench-logs-", dir=ram)) \
            if ram else self.work
        if ram:
            self.stack.callback(shutil.rmtree, self.logdir, ignore_errors=True)
        # The fork-exec requests: the first 2,000 are plenty for a few hundred runs.
        lines = (self.mixes / "forkexec.txt").read_text().splitlines(keepends=True)[:2000]
        (self.work / "forkexec.txt").write_text("".join(lines))
        self.results["environment"] = {
            "python": sys.version.split()[0], "executable": sys.executable,
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "kernel": platform.release(), "load_before": os.getloadavg(),
            "source": _source_revision(),
            "daemon_logs": str(self.logdir),
            "dataset": asdict(self.data) | {"max_list": max(self.data.sizes),
                                            "min_list": min(self.data.sizes)},
            "small_dataset": asdict(self.small),
            "duration_s": self.duration, "open_duration_s": self.open_duration,
            "runs": self.args.runs, "quick": self.args.quick,
        }
        log(f"prepared in {time.monotonic() - started:.1f} s (state in {self.state})")

    # --- load generator ---------------------------------------------------------------------

    def loadgen_cmd(self, shape: str, target: str | None, requests: Path, concurrency: int,
                    duration: float, *, rate: float = 0, timeline: float = 0,
                    cpu: str = CLIENT_CPU, extra=(), poisson: bool = False, seed: int = 1,
                    timeout: float = 0) -> list[str]:
        start = self.cursor.get(self._cursor_key(shape, requests), 0) if shape != "exec" else 0
        cmd = ["taskset", "-c", cpu, str(self.loadgen), "--mode", shape,
               "--requests", str(requests), "--concurrency", str(concurrency),
               "--duration", f"{duration:g}", "--warmup", f"{self.warmup:g}",
               "--start", str(start)]
        if target:
            cmd += ["--target", target]
        if rate:
            cmd += ["--rate", f"{rate:.0f}"]
        if poisson:
            cmd += ["--poisson", "1", "--seed", str(seed)]
        if timeline:
            cmd += ["--timeline", f"{timeline:g}"]
        if timeout:
            cmd += ["--timeout", f"{timeout:g}"]
        return cmd + list(extra)

    def run_load(self, label: str, shape: str, target: str, concurrency: int, *,
                 server_pid: int | None = None, rate: float = 0, duration: float | None = None,
                 requests: Path | None = None, poisson: bool = False, seed: int = 1,
                 timeout: float = 0) -> dict:
        duration = duration or self.duration
        requests = requests or self.mixes / ("exim.txt" if shape == "exim" else "postfix.txt")
        cmd = self.loadgen_cmd(shape, target, requests, concurrency, duration, rate=rate,
                               poisson=poisson, seed=seed, timeout=timeout)
        cpu0 = cpu_seconds(server_pid) if server_pid else None
        delay0 = run_delay(server_pid) if server_pid else None
        daemon = next((s["daemon"] for s in self.servers.values()
                       if "daemon" in s and s["pid"] == server_pid), None)
        store0 = _store_events(daemon)
        steal0 = steal_seconds()
        with self.others_paused(server_pid):
            wall0 = time.monotonic()
            out = subprocess.run(cmd, capture_output=True, text=True,
                                 timeout=duration + max(60, 2 * timeout))
            wall = time.monotonic() - wall0
        if out.returncode != 0 or not out.stdout.strip():
            raise SystemExit(f"bench: load generator failed: {out.stderr.strip()}")
        result = json.loads(out.stdout)
        result["label"] = label
        self.advance(shape, result, requests)
        result["steal_share"] = round((steal_seconds() - steal0) / wall, 4)
        if server_pid:
            used = cpu_seconds(server_pid) - cpu0
            result["server_cpu_share"] = round(used / wall, 3)
            total = result["qps"] * wall
            result["server_cpu_us_per_req"] = round(used / total * 1e6, 1) if total else None
            result["server_off_cpu_share"] = round((run_delay(server_pid) - delay0) / wall, 4)
        if daemon is not None:
            # What the store thread did meanwhile (a snapshot loaded, a verification
            # build): work that competes with the reactor, reported beside the figures.
            after = _store_events(daemon)
            if store0 is not None and after is not None:
                age = after["verified_age"]
                result["store_loads"] = after["loads"] - store0["loads"]
                result["verification_build"] = age is not None and age < wall + 0.5 and (
                    store0["verified_age"] is None or age < store0["verified_age"])
        self.results["runs"].append(result)
        return result

    # --- servers ------------------------------------------------------------------------------

    def start_daemon(self, name: str, store: Path, **kwargs) -> "Daemon":
        kwargs.setdefault("log_dir", self.logdir)
        daemon = Daemon(self.python, self.work, self.sockdir, name, f"sqlite:///{store}",
                        **kwargs)
        self.stack.callback(daemon.stop)
        startup = daemon.wait_ready()
        self.servers[name] = {"pid": daemon.pid, "exim": f"unix:{daemon.exim}",
                              "postfix": f"unix:{daemon.postfix}", "daemon": daemon,
                              "startup_s": startup}
        if daemon.tcp_port:
            self.servers[name]["postfix-tcp"] = f"tcp:127.0.0.1:{daemon.tcp_port}"
        log(f"{name} ready in {startup:.1f} s ([postfix] mode = {daemon.postfix_mode})")
        return daemon

    def start_refserver(self, name: str, lookup: Path | None = None) -> None:
        port = free_port()
        exim = self.sockdir / f"{name}-exim.sock"
        postfix = self.sockdir / f"{name}-postfix.sock"
        cmd = ["taskset", "-c", SERVER_CPU, str(self.python), "-m", "bench.refserver",
               "--exim", f"unix:{exim}", "--postfix", f"unix:{postfix}",
               "--postfix", f"tcp:{port}:interface=127.0.0.1"]
        if lookup is not None:
            cmd += ["--lookup", str(lookup)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
        self.stack.callback(_stop, proc)
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"bench: the reference server {name} did not start")
        self.servers[name] = {"pid": proc.pid, "exim": f"unix:{exim}",
                              "postfix": f"unix:{postfix}",
                              "postfix-tcp": f"tcp:127.0.0.1:{port}", "proc": proc}

    def truncate_logs(self) -> None:
        for server in self.servers.values():
            if "daemon" in server:
                server["daemon"].truncate_log()

    def requests_for(self, server: str, shape: str) -> Path:
        mixes = self.small_mixes if server.endswith("-10k") else self.mixes
        return mixes / ("exim.txt" if shape == "exim" else "postfix.txt")

    # --- closed loop -------------------------------------------------------------------------

    CLOSED_PLAN = (
        [("policyd", "exim", "unix", c) for c in (1, 8, 64)]
        + [("constant", "exim", "unix", c) for c in (1, 8, 64)]
        + [("lookup", "exim", "unix", 8), ("policyd-10k", "exim", "unix", 8)]
        + [("policyd", "postfix", "unix", c) for c in (1, 8, 64)]
        + [("constant", "postfix", "unix", c) for c in (1, 8, 64)]
        + [("policyd-safe", "postfix", "unix", 8), ("lookup", "postfix", "unix", 8),
           ("policyd-10k", "postfix", "unix", 8)]
        + [("policyd", "postfix", "tcp", 8), ("constant", "postfix", "tcp", 8)]
    )

    def closed_loop(self) -> None:
        """Every plan entry once per run, servers interleaved within a run."""
        self.suite("closed loop (policyd envelope + safe, 10k store, constant and "
                   "same-lookup bare Twisted)")
        collected: dict = {}
        for run in range(self.args.runs):
            log(f"closed loop, run {run + 1} of {self.args.runs}")
            for server, shape, sock, c in self.CLOSED_PLAN:
                target = self.servers[server][shape if sock == "unix" else "postfix-tcp"]
                result = self.run_load(f"{server} {shape}-{sock}-c{c}", shape, target, c,
                                       server_pid=self.servers[server]["pid"],
                                       requests=self.requests_for(server, shape))
                self.truncate_logs()
                collected.setdefault((server, shape, sock, c), []).append(result)
                log(f"  {server:13} {shape:7} {sock:4} c={c:<3} {result['qps']:>9,.0f} q/s  "
                    f"p99 {result['p99_ms']:7.2f} ms  CPU {_fmt(result.get('server_cpu_us_per_req'), '.0f')} "
                    f"µs/req  errors {result['errors'] + result['bad_replies']}")
        table = {}
        for (server, shape, sock, c), runs in collected.items():
            table[f"{server} {shape}-{sock}-c{c}"] = {
                "server": server, "shape": shape, "socket": sock, "concurrency": c,
                "qps": median(r["qps"] for r in runs),
                "qps_runs": [r["qps"] for r in runs],
                "p50_ms": median(r["p50_ms"] for r in runs),
                "p99_ms": median(r["p99_ms"] for r in runs),
                "p999_ms": median(r["p999_ms"] for r in runs),
                "cpu_us_per_req": median(r.get("server_cpu_us_per_req") for r in runs),
                "errors": sum(r["errors"] + r["bad_replies"] for r in runs),
                "replies": runs[-1]["replies"],
            }
        self.results["figures"]["closed"] = table
        # issue 6's rebuild figure reads policyd's Postfix c=8 rate from here
        self.results["figures"]["throughput"] = {
            f"{v['shape']}-{v['socket']}-c{v['concurrency']}": v
            for v in table.values() if v["server"] == "policyd"}

        def ratio(mine, ref, key=(lambda r: r["qps"])):
            pairs = zip(collected[mine], collected[ref])
            return median(key(m) / key(r) for m, r in pairs if key(r))

        for shape, label in (("exim", "exim_c8_vs_constant"),
                             ("postfix", "postfix_c8_vs_constant")):
            mine = ("policyd", shape, "unix", 8)
            const = ("constant", shape, "unix", 8)
            row = table[f"policyd {shape}-unix-c8"]
            detail = (f"policyd {row['qps']:,.0f} q/s, constant "
                      f"{table[f'constant {shape}-unix-c8']['qps']:,.0f}, same-lookup "
                      f"{table[f'lookup {shape}-unix-c8']['qps']:,.0f}")
            errors = row["errors"]
            if shape == "postfix":
                safe = table["policyd-safe postfix-unix-c8"]
                detail = ("envelope mode: " + detail + f"; safe mode {safe['qps']:,.0f} q/s = "
                          f"{ratio(('policyd-safe', shape, 'unix', 8), const):.2f} x")
                errors += safe["errors"]
            self.measure(label, ratio(mine, const), detail, errors)
            scale = ratio(mine, ("policyd-10k", shape, "unix", 8))
            small = table[f"policyd-10k {shape}-unix-c8"]
            self.measure(f"{shape}_scale_1m_vs_10k", scale,
                         f"{row['qps']:,.0f} vs {small['qps']:,.0f} q/s",
                         row["errors"] + small["errors"])

    # --- open loop ---------------------------------------------------------------------------

    def open_loop(self) -> None:
        """Poisson arrivals at fractions of policyd's closed-loop c=8 maximum."""
        self.suite("open loop (Poisson arrivals; latency from the scheduled send time)")
        closed = self.results["figures"]["closed"]
        daemon = self.servers["policyd"]["daemon"]
        out: dict = {}
        timeline_out: dict = {}
        for shape in ("exim", "postfix"):
            peak = closed[f"policyd {shape}-unix-c8"]["qps"]
            for fraction in OPEN_LOOP_FRACTIONS:
                rate = fraction * peak
                runs: dict = {"policyd": [], "lookup": []}
                for run in range(self.args.runs):
                    for server in ("policyd", "lookup"):
                        record = (server == "policyd" and daemon.timeline is not None
                                  and fraction == OPEN_LOOP_FRACTIONS[-1])
                        if record:
                            os.kill(daemon.pid, signal.SIGUSR1)
                        result = self.run_load(
                            f"{server} {shape} open loop {fraction:.0%}", shape,
                            self.servers[server][shape], OPEN_LOOP_SLOTS,
                            server_pid=self.servers[server]["pid"], rate=rate,
                            duration=self.open_duration, poisson=True, seed=run + 1)
                        if record:
                            os.kill(daemon.pid, signal.SIGUSR2)
                            time.sleep(1.0)
                            from . import timeline

                            saved = self.state / f"timeline-{shape}-{run + 1}.json"
                            shutil.copyfile(daemon.timeline, saved)
                            timeline_out[f"{shape}-{run + 1}"] = timeline.summarise(str(saved))
                        self.truncate_logs()
                        runs[server].append(result)
                        log(f"  {shape:7} {fraction:4.0%} {rate:>8,.0f}/s {server:8} p50 "
                            f"{result['p50_ms']:7.3f}  p99 {result['p99_ms']:8.3f}  p99.9 "
                            f"{result['p999_ms']:8.3f}  max {result['max_ms']:8.2f} ms  "
                            f"off-CPU {100 * result.get('server_off_cpu_share', 0):4.1f}%  "
                            f"steal {100 * result['steal_share']:4.1f}%  errors "
                            f"{result['errors'] + result['bad_replies']}"
                            + ("  [verification build]" if result.get("verification_build")
                               else "")
                            + (f"  [{result['store_loads']} snapshot loads]"
                               if result.get("store_loads") else ""))
                row = {"rate": rate, "fraction": fraction}
                for server, rs in runs.items():
                    for key in ("p50_ms", "p99_ms", "p999_ms", "max_ms", "qps"):
                        row[f"{server}_{key}"] = median(r[key] for r in rs)
                    row[f"{server}_errors"] = sum(r["errors"] + r["bad_replies"] for r in rs)
                    row[f"{server}_off_cpu_share"] = median(
                        r.get("server_off_cpu_share") for r in rs)
                row["p99_ratio"] = median(m["p99_ms"] / r["p99_ms"]
                                          for m, r in zip(runs["policyd"], runs["lookup"])
                                          if r["p99_ms"])
                row["steal_share"] = median(r["steal_share"] for rs in runs.values() for r in rs)
                out[f"{shape}-{int(fraction * 100)}"] = row
            high = out[f"{shape}-75"]
            half = out[f"{shape}-50"]

            def disturbed(row):
                """A note when the servers were kept off their CPU (another process had
                it): such a run measures the machine, not policyd."""
                worst = max(row["policyd_off_cpu_share"] or 0, row["lookup_off_cpu_share"] or 0)
                return (f"; DISTURBED: servers off-CPU up to {100 * worst:.0f}% of the run"
                        if worst > 0.05 else "")

            self.measure(f"{shape}_open75_p99_vs_lookup", high["p99_ratio"],
                         f"{high['rate']:,.0f}/s: p99 {high['policyd_p99_ms']:.2f} vs "
                         f"{high['lookup_p99_ms']:.2f} ms, p99.9 {high['policyd_p999_ms']:.2f} "
                         f"vs {high['lookup_p999_ms']:.2f} ms" + disturbed(high),
                         high["policyd_errors"] + high["lookup_errors"])
            self.measure(f"{shape}_open50_p999_ms", half["policyd_p999_ms"],
                         f"{half['rate']:,.0f}/s; p99 {half['policyd_p99_ms']:.2f} ms; same "
                         f"lookup p99.9 {half['lookup_p999_ms']:.2f} ms" + disturbed(half),
                         half["policyd_errors"])
        self.results["figures"]["open"] = out
        if timeline_out:
            self.results["figures"]["timeline"] = timeline_out
            for key, summary in timeline_out.items():
                log(f"  timeline {key}: turns p99 {summary['turn_ms']['p99']} ms, max "
                    f"{summary['turn_ms']['max']} ms, long turns {summary['long_turn_count']}, "
                    f"late waits {summary['late_waits']}, reactor busy "
                    f"{summary['busy_share']:.0%}, off-CPU "
                    f"{_fmt(summary['reactor_thread_runnable_not_running_s'], '.3f')} s, "
                    "µs per event by events per turn " + ", ".join(
                        f"{k}: {v['us_per_event']}" for k, v in
                        summary["us_per_event_by_events_per_turn"].items()))

    # --- metrics on / off --------------------------------------------------------------------

    def metrics_cost(self) -> None:
        """CPU per request at the same fixed rate, ``[metrics] listen`` on and off (10k
        store: the cost is per request, not per membership)."""
        self.suite("metrics on / off (CPU per request at a fixed rate)")
        if not metrics_configurable():
            self.measure("metrics_cpu_ratio", skip="policyd's configuration has no "
                         "[metrics] listen yet")
            log("metrics: [metrics] listen is not a key of policyd's configuration: skipped")
            return
        port = free_port()
        try:
            self.start_daemon("policyd-10k-metrics", self.small_store,
                              metrics=f"tcp:{port}:interface=127.0.0.1")
        except SystemExit as error:
            self.measure("metrics_cpu_ratio", None, f"the daemon with metrics did not "
                         f"start: {error}")
            return
        closed = self.results["figures"]["closed"]
        out = {}
        for shape in ("exim", "postfix"):
            rate = 0.5 * closed[f"policyd-10k {shape}-unix-c8"]["qps"]
            pairs = []
            for run in range(self.args.runs):
                on = self.run_load(f"metrics on {shape}", shape,
                                   self.servers["policyd-10k-metrics"][shape], 8,
                                   server_pid=self.servers["policyd-10k-metrics"]["pid"],
                                   rate=rate, requests=self.requests_for("policyd-10k", shape))
                off = self.run_load(f"metrics off {shape}", shape,
                                    self.servers["policyd-10k"][shape], 8,
                                    server_pid=self.servers["policyd-10k"]["pid"], rate=rate,
                                    requests=self.requests_for("policyd-10k", shape))
                self.truncate_logs()
                pairs.append((on, off))
                log(f"  {shape:7} {rate:,.0f}/s  metrics on {on['server_cpu_us_per_req']} "
                    f"µs/req, off {off['server_cpu_us_per_req']} µs/req")
            out[shape] = {
                "rate": rate,
                "on_us": median(p[0]["server_cpu_us_per_req"] for p in pairs),
                "off_us": median(p[1]["server_cpu_us_per_req"] for p in pairs),
                "ratio": median(p[0]["server_cpu_us_per_req"] / p[1]["server_cpu_us_per_req"]
                                for p in pairs if p[1]["server_cpu_us_per_req"]),
                "errors": sum(p[0]["errors"] + p[0]["bad_replies"] for p in pairs),
            }
        scraped = _http_get("127.0.0.1", port, "/metrics")
        out["scrape_ok"] = scraped.startswith("HTTP/1.") and " 200 " in scraped.split("\n")[0]
        self.results["figures"]["metrics"] = out
        worse = max(("exim", "postfix"), key=lambda s: out[s]["ratio"] or 0)
        self.measure("metrics_cpu_ratio", out[worse]["ratio"],
                     f"{worse} {out[worse]['on_us']:.0f} vs {out[worse]['off_us']:.0f} µs/req; "
                     f"{'exim' if worse == 'postfix' else 'postfix'} "
                     f"{out['exim' if worse == 'postfix' else 'postfix']['ratio']:.3f} x"
                     + ("" if out["scrape_ok"] else "; the endpoint did not answer 200"),
                     out["exim"]["errors"] + out["postfix"]["errors"]
                     + (0 if out["scrape_ok"] else 1))
        self.servers.pop("policyd-10k-metrics")["daemon"].stop()

    # --- issue 16: the Exim request with the message ----------------------------------------

    def exim_headers(self) -> None:
        """Exim closed loop c=8 with the DATA ACL's whole request (``headers=`` of 2-4 KB,
        ``body=``, ``size=``, ``client=``; ``bench.headermix``): policyd on the 1M store
        and the same-lookup refserver, interleaved run by run.  Without headers: the
        closed loop's figures of the same servers."""
        self.suite("Exim with the message (2-4 KB header block; closed loop c=8)")
        runs: dict = {"policyd": [], "lookup": []}
        for run in range(self.args.runs):
            for server in ("policyd", "lookup"):
                result = self.run_load(f"{server} exim-headers-unix-c8", "exim",
                                       self.servers[server]["exim"], 8,
                                       server_pid=self.servers[server]["pid"],
                                       requests=self.header_mix)
                self.truncate_logs()
                runs[server].append(result)
                log(f"  {server:8} exim with headers c=8 {result['qps']:>9,.0f} q/s  p99 "
                    f"{result['p99_ms']:7.2f} ms  CPU "
                    f"{_fmt(result.get('server_cpu_us_per_req'), '.0f')} µs/req  replies "
                    f"{result['replies']}  errors {result['errors'] + result['bad_replies']}")
        closed = self.results["figures"]["closed"]
        figure: dict = {"mix": self.results.get("header_mix")}
        for server, rs in runs.items():
            plain = closed[f"{server} exim-unix-c8"]
            # policyd never defers these (no moderation, no store trouble): a DEFER is a
            # request it could not read
            deferred = sum(r["replies"].get("DEFER", 0) for r in rs) \
                if server == "policyd" else 0
            figure[server] = {
                "qps": median(r["qps"] for r in rs),
                "cpu_us_per_req": median(r.get("server_cpu_us_per_req") for r in rs),
                "p99_ms": median(r["p99_ms"] for r in rs),
                "errors": sum(r["errors"] + r["bad_replies"] for r in rs) + deferred,
                "deferred": deferred, "replies": rs[-1]["replies"],
                "plain_qps": plain["qps"], "plain_cpu_us_per_req": plain["cpu_us_per_req"]}
        figure["ratio"] = median(m["qps"] / r["qps"] for m, r in zip(runs["policyd"],
                                                                   runs["lookup"]) if r["qps"])
        self.results["figures"]["exim_headers"] = figure
        mine, ref, mix = figure["policyd"], figure["lookup"], figure["mix"] or {}
        self.measure("exim_headers_c8_vs_lookup", figure["ratio"],
                     f"policyd {mine['qps']:,.0f} q/s, "
                     f"{_fmt(mine['cpu_us_per_req'], '.0f')} µs CPU/req (without headers "
                     f"{mine['plain_qps']:,.0f} q/s, {_fmt(mine['plain_cpu_us_per_req'], '.0f')}"
                     f" µs); same-lookup {ref['qps']:,.0f} q/s, "
                     f"{_fmt(ref['cpu_us_per_req'], '.0f')} µs (without "
                     f"{_fmt(ref['plain_cpu_us_per_req'], '.0f')} µs); header blocks "
                     f"{mix.get('header_bytes_min', 0):,}-{mix.get('header_bytes_max', 0):,} B"
                     + (f"; {mine['deferred']} DEFER answers" if mine["deferred"] else ""),
                     mine["errors"] + ref["errors"])

    # --- issue 17: SMTP-time moderation on / off ----------------------------------------------

    def moderation_cost(self) -> None:
        """CPU per request at the same fixed rate on the 10k store, every list's
        ``smtp_moderation = greylist`` against the running 10k daemon (off).  Lookups
        only: ``bench.modprime`` remembers, before the daemon starts, every (list, sender)
        of the mixes that moderation looks at, so each such request is one index lookup
        (``remembered``) and no state row is written per request.  Exim: the requests
        with the message (moderation runs at DATA only); Postfix: the usual mix."""
        from policyd import control_client

        self.suite("SMTP-time moderation on / off (greylist on every list, lookups only; "
                   "CPU per request at a fixed rate)")
        store = self.work / "moderation.sqlite"
        shutil.copyfile(self.small_pristine, store)
        postfix_requests = self.small_mixes / "postfix.txt"
        primed = subprocess.run(
            [str(self.python), "-m", "bench.modprime", str(store), "greylist",
             str(self.small_header_mix), str(postfix_requests)],
            capture_output=True, text=True, cwd=REPO, timeout=600)
        if primed.returncode != 0:
            raise RuntimeError(f"bench.modprime failed: {primed.stderr.strip()[-500:]}")
        info = json.loads(primed.stdout)
        log(f"  primed: {info['remembered']:,} remembered senders; lookups in the mixes: "
            f"exim {info['exim_lookups']:,} of {info['exim_requests']:,}, postfix "
            f"{info['postfix_lookups']:,} of {info['postfix_requests']:,}")
        daemon = self.start_daemon("policyd-10k-moderation", store)
        try:
            sample = info["sample"]
            if sample is None:
                raise RuntimeError("no Postfix request of the mix reaches moderation: "
                                   "nothing to measure")
            deadline = time.monotonic() + 30
            state = {}
            while time.monotonic() < deadline:  # the first sync loads the state
                answer = control_client.query(daemon.control, sample["recipient"],
                                              sample["sender"], timeout=10)
                state = answer.get("moderation") or {}
                if state.get("usable") and state.get("remembered_until"):
                    break
                time.sleep(0.25)
            else:
                raise RuntimeError(f"the moderation state was not loaded in 30 s: {state}")
            closed = self.results["figures"]["closed"]
            headers = self.results["figures"].get("exim_headers", {}).get("policyd", {})
            rates = {"exim": 0.5 * headers["qps"] if headers.get("qps")
                     else 0.25 * closed["policyd-10k exim-unix-c8"]["qps"],
                     "postfix": 0.5 * closed["policyd-10k postfix-unix-c8"]["qps"]}
            out: dict = {"primed": info}
            for shape, requests in (("exim", self.small_header_mix),
                                    ("postfix", postfix_requests)):
                rate = rates[shape]
                pairs = []
                transitions: dict = {}
                for run in range(self.args.runs):
                    on = self.run_load(f"moderation on {shape}", shape,
                                       self.servers["policyd-10k-moderation"][shape], 8,
                                       server_pid=daemon.pid, rate=rate, requests=requests)
                    off = self.run_load(f"moderation off {shape}", shape,
                                        self.servers["policyd-10k"][shape], 8,
                                        server_pid=self.servers["policyd-10k"]["pid"],
                                        rate=rate, requests=requests)
                    # the on run's decision lines, flushed by now
                    for name, count in _moderation_transitions(daemon.log_file).items():
                        transitions[name] = transitions.get(name, 0) + count
                    self.truncate_logs()
                    pairs.append((on, off))
                    log(f"  {shape:7} {rate:,.0f}/s  moderation on "
                        f"{on['server_cpu_us_per_req']} µs/req, off "
                        f"{off['server_cpu_us_per_req']} µs/req; lookups so far "
                        f"{transitions}")
                out[shape] = {
                    "rate": rate,
                    "on_us": median(p[0]["server_cpu_us_per_req"] for p in pairs),
                    "off_us": median(p[1]["server_cpu_us_per_req"] for p in pairs),
                    "ratio": median(p[0]["server_cpu_us_per_req"]
                                    / p[1]["server_cpu_us_per_req"]
                                    for p in pairs if p[1]["server_cpu_us_per_req"]),
                    "errors": sum(p[0]["errors"] + p[0]["bad_replies"] + p[1]["errors"]
                                  + p[1]["bad_replies"] for p in pairs),
                    "replies_on": pairs[-1][0]["replies"],
                    "replies_off": pairs[-1][1]["replies"],
                    # what moderation did with the requests it looked at (decision log)
                    "transitions": transitions,
                }
        finally:
            self.servers.pop("policyd-10k-moderation")["daemon"].stop()
        self.results["figures"]["moderation"] = out
        worse = max(("exim", "postfix"), key=lambda s: out[s]["ratio"] or 0)
        other = "exim" if worse == "postfix" else "postfix"

        def looked(shape):
            t = out[shape]["transitions"]
            return (f"{shape} {sum(t.values()):,} lookups"
                    + (f" ({', '.join(f'{k} {v:,}' for k, v in sorted(t.items()))})"
                       if t else ""))

        # A lookup that was not "remembered" wrote a state row: not "lookups only".
        stateful = sum(v for shape in ("exim", "postfix")
                       for k, v in out[shape]["transitions"].items() if k != "remembered")
        self.measure("moderation_cpu_ratio", out[worse]["ratio"],
                     f"{worse} {out[worse]['on_us']:.0f} vs {out[worse]['off_us']:.0f} µs/req;"
                     f" {other} {_fmt(out[other]['ratio'], '.3f')} x; {looked('exim')}, "
                     f"{looked('postfix')}"
                     + (f"; {stateful} requests created moderation state" if stateful else ""),
                     out["exim"]["errors"] + out["postfix"]["errors"])

    # --- issue 13: codec time against the request's size ------------------------------------

    def codecs(self) -> None:
        """In-process parse time of an Exim line and a Postfix request of 1, 8, 64 KB
        (``bench.codectime``)."""
        self.suite("codecs (in-process parse time against the request size)")
        done = subprocess.run(["taskset", "-c", SERVER_CPU, str(self.python), "-m",
                               "bench.codectime"], capture_output=True, text=True, cwd=REPO,
                              timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"bench.codectime failed: {done.stderr.strip()[-500:]}")
        figure = json.loads(done.stdout)
        self.results["figures"]["codecs"] = figure
        names = ("exim", "postfix", "postfix_chunked")
        for name in names:
            log(f"  {name:15} " + ", ".join(
                f"{int(size) // 1024} KB {figure[name][str(size)]['us']:g} µs "
                f"({figure[name][str(size)]['ns_per_byte']:g} ns/B)"
                for size in figure["sizes"]) + f"; 64 KB / 8 KB {figure[name]['ratio']:g}")
        worst = max(names, key=lambda n: figure[n]["ratio"])
        self.measure("codec_64k_vs_8k", figure[worst]["ratio"], "; ".join(
            f"{name.replace('_', ' ')} " + " / ".join(
                f"{figure[name][str(size)]['us']:.3g}" for size in figure["sizes"])
            + f" µs = {figure[name][str(figure['sizes'][-1])]['ns_per_byte']:.3g} ns/B at "
            "64 KB" for name in names) + " (1 / 8 / 64 KB)")

    # --- issue 12: NOTIFY propagation and the polling load on PostgreSQL ---------------------

    def pg_propagation(self) -> None:
        """``bench.propagation.bench_figures``: 3 daemons on one PostgreSQL database with
        NOTIFY (commit to the first reflecting answer in each), then 3 idle polling
        daemons (the database's transactions per second per daemon)."""
        self.suite("propagation on PostgreSQL (NOTIFY, 3 daemons) and the polling load")
        if self.args.skip_postgresql:
            self.measure("notify_propagation_ms", skip="--skip-postgresql")
            return
        from . import propagation

        try:
            import psycopg2

            psycopg2.connect(dbname="postgres", host="127.0.0.1", port=5432,
                             user="postgres", connect_timeout=5).close()
        except Exception as error:  # noqa: BLE001 - no PostgreSQL here: a SKIP, said why
            self.measure("notify_propagation_ms",
                         skip=f"PostgreSQL unavailable: {str(error).strip()[:120]}")
            return
        quick = self.args.quick
        figure = propagation.bench_figures(daemons=3, changes=4 if quick else 10,
                                           idle=6.0 if quick else 20.0)
        self.results["figures"]["pg_propagation"] = figure
        notify, poll = figure["notify"], figure["poll"]
        load = poll["idle_load"]
        log(f"  NOTIFY: commit to first answer, median per daemon {notify['median_ms']} ms, "
            f"worst {notify['max_ms']} ms ({notify['changes']} changes)")
        log(f"  polling (refresh_interval {poll['refresh_interval']:g} s): "
            f"{load['per_daemon_per_s']:.2f}/s per idle daemon ({load['source']}, "
            f"{load['seconds']:g} s)")
        everything = [x for times in notify["all_ms"] for x in times]
        self.measure("notify_propagation_ms", max(notify["median_ms"]),
                     f"medians per daemon {', '.join(f'{m:.0f}' for m in notify['median_ms'])}"
                     f" ms, worst {max(everything):.0f} ms; {notify['changes']} changes, 3 "
                     f"daemons, refresh_interval {notify['refresh_interval']:g} s")

    # --- the peer ----------------------------------------------------------------------------

    def peer(self) -> None:
        """policyd and the best postfwd set-up on the membership job (Postfix, TCP, c=8)."""
        from . import peer

        self.suite("peer: postfwd on the membership job (100 lists x 1,000 members)")
        found = peer.ensure_postfwd(log=log)
        port = free_port()
        self.start_daemon("policyd-job", self.job_store, tcp_port=port)
        runs = []
        for _ in range(self.args.runs):
            result = self.run_load("policyd job", "postfix",
                                   self.servers["policyd-job"]["postfix-tcp"], 8,
                                   server_pid=self.servers["policyd-job"]["pid"],
                                   requests=self.job_requests)
            self.truncate_logs()
            runs.append(result)
        ours = median(r["qps"] for r in runs)
        errors = sum(r["errors"] + r["bad_replies"] for r in runs)
        log(f"  policyd on the job: {ours:,.0f} q/s (replies {runs[-1]['replies']})")
        self.servers.pop("policyd-job")["daemon"].stop()
        figure = {"policyd_qps": ours, "policyd_replies": runs[-1]["replies"], "postfwd": {}}
        self.results["figures"]["peer"] = figure
        if isinstance(found, str):
            log(f"  postfwd: skipped: {found}")
            self.measure("postfwd_ratio", skip=found)
            return
        rules_dir = self.work / "postfwd"
        for ruleset in peer.RULESETS:
            rules = peer.write_rules(rules_dir, self.job, ruleset)
            for program, path in sorted(found.items()):
                name = f"{program} {ruleset}"
                workdir = self.work / f"postfwd-{program}-{ruleset}"
                workdir.mkdir(exist_ok=True)
                try:
                    server = peer.Postfwd(path, rules, free_port(), workdir, SERVER_CPU)
                except RuntimeError as error:
                    figure["postfwd"][name] = {"error": str(error)}
                    log(f"  {name}: did not start: {error}")
                    continue
                try:
                    server.wait_ready()
                    result = self.run_load(f"postfwd {name}", "postfix",
                                           f"tcp:127.0.0.1:{server.port}", 8,
                                           server_pid=None, requests=self.job_requests,
                                           duration=max(self.duration, 8.0), timeout=30)
                except RuntimeError as error:
                    figure["postfwd"][name] = {"error": str(error)}
                    log(f"  {name}: {error}")
                    continue
                finally:
                    server.stop()
                figure["postfwd"][name] = {
                    "qps": result["qps"], "p50_ms": result["p50_ms"],
                    "errors": result["errors"] + result["bad_replies"],
                    "replies": result["replies"]}
                log(f"  {name}: {result['qps']:,.1f} q/s (p50 {result['p50_ms']:.0f} ms, "
                    f"errors {result['errors'] + result['bad_replies']}, replies "
                    f"{result['replies']})")
        measured = {k: v for k, v in figure["postfwd"].items()
                    if "qps" in v and v["qps"] > 0 and not v["errors"]}
        if not measured:
            self.measure("postfwd_ratio", None, "no postfwd set-up answered without errors")
            return
        best = max(measured, key=lambda k: measured[k]["qps"])
        figure["best"] = best
        self.measure("postfwd_ratio", ours / measured[best]["qps"],
                     f"policyd {ours:,.0f} q/s, best postfwd ({best}) "
                     f"{measured[best]['qps']:,.1f} q/s", errors)

    # --- Mailman 3 -------------------------------------------------------------------------------

    def mailman3(self) -> None:
        self.suite("Mailman 3 database (bench.mailman3)")
        python = self.args.mailman_python
        if python is None or not Path(python).exists():
            reason = (f"no Mailman interpreter at {python}" if python else
                      "no --mailman-python given")
            for key in ("mailman3_build_s", "mailman3_notice_s"):
                self.measure(key, skip=reason)
            log(f"Mailman 3 suite skipped: {reason}")
            return
        from . import mailman3

        results = mailman3.run(self.state, python, runs=self.args.runs,
                               postgresql=False if self.args.skip_postgresql else None,
                               **({"n_lists": 100, "n_memberships": 10_000}
                                  if self.args.quick else {}))
        (self.state / "mailman3.json").write_text(json.dumps(results, indent=1) + "\n")
        log(mailman3.render(results))
        self.results["figures"]["mailman3"] = results
        dbs = {name: db for name, db in results["databases"].items() if "targets" in db}
        for key, target in (("mailman3_build_s", "build"), ("mailman3_notice_s", "notice")):
            values = {name: db["targets"][target]["value_s"] for name, db in dbs.items()}
            if any(v is None for v in values.values()) or not values:
                self.measure(key, None, "not measured: " + ", ".join(
                    name for name, v in values.items() if v is None))
                continue
            worst = max(values, key=values.get)
            detail = ", ".join(f"{name} {v:.2f} s" for name, v in values.items())
            if target == "build":
                with_gc = {name: db["in_process"].get("build_with_gc_median_s")
                           for name, db in dbs.items()}
                if all(with_gc.values()):
                    detail += "; in-process with the cyclic collector on: " + ", ".join(
                        f"{name} {v:.2f} s" for name, v in with_gc.items())
            self.measure(key, values[worst], detail)

    # --- issue 6's figures, unchanged -----------------------------------------------

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
        figures = self.results["figures"]
        with self.stack:
            self.suite("setup")
            self.prepare()

            log("memory: empty daemon")
            rss_empty = self.empty_daemon_rss()

            timeline = self.state / "timeline.json" if self.args.timeline else None
            daemon = self.start_daemon("policyd", self.store, tcp_port=free_port(),
                                       timeline=timeline)
            time.sleep(1.0)
            rss_loaded = proc_status(daemon.pid)["VmRSS"]
            log(f"policyd RSS {rss_loaded / 2**20:.0f} MiB (empty daemon "
                f"{rss_empty / 2**20:.0f} MiB)")
            self.start_daemon("policyd-safe", self.store, postfix_mode="safe")
            self.start_daemon("policyd-10k", self.small_store)
            self.start_refserver("constant")
            self.start_refserver("lookup", lookup=self.store)

            self.closed_loop()
            self.open_loop()
            self.guarded(("exim_headers_c8_vs_lookup",), self.exim_headers)
            self.servers.pop("policyd-safe")["daemon"].stop()
            for name in ("constant", "lookup"):
                _stop(self.servers.pop(name)["proc"])
            if self.args.py_spy:
                self.profile(daemon)

            self.suite("memory")
            rss_after = proc_status(daemon.pid)["VmRSS"]
            memberships = self.data.memberships
            figures["memory"] = {
                "rss_empty": rss_empty, "rss_loaded": rss_loaded, "rss_after_load": rss_after,
                "bytes_per_membership": (rss_after - rss_empty) / memberships,
                "bytes_per_membership_at_start": (rss_loaded - rss_empty) / memberships,
                "startup_s": self.servers["policyd"]["startup_s"],
            }
            bpm = figures["memory"]["bytes_per_membership"]
            log(f"memory: {rss_after / 2**20:.0f} MiB after the load runs, {bpm:.0f} B per "
                "membership")
            at_start = figures["memory"]["bytes_per_membership_at_start"]
            self.measure("bytes_per_membership", bpm,
                         f"RSS {rss_after / 1e6:.0f} MB loaded, {rss_empty / 1e6:.0f} MB empty, "
                         f"{memberships:,} memberships; {at_start:.1f} B at start, before "
                         "the load runs")

            self.guarded(("metrics_cpu_ratio",), self.metrics_cost)
            self.guarded(("moderation_cpu_ratio",), self.moderation_cost)
            self.servers.pop("policyd-10k")["daemon"].stop()

            self.suite("rebuild under load")
            self.rebuild_under_load(daemon)
            figures["memory"]["peak_rss_after_rebuilds"] = proc_status(daemon.pid)["VmHWM"]
            rb = figures["rebuild"]
            self.measure("rebuild_worst_ms", rb["worst_ms_all_runs"],
                         f"median {rb['worst_ms']:.1f} ms at {rb['rate']:,.0f} q/s; rebuild "
                         f"{rb['reload_s']:.1f} s", rb["errors"])
            self.suite("change propagation")
            self.propagation(daemon)
            pr = figures["propagation"]
            self.measure("propagation_s", pr["worst_s"],
                         f"median {_fmt(pr['seen_after_s'], '.2f', ' s')}, worst of "
                         f"{self.args.runs}; refresh_interval {pr['refresh_interval']:g} s")
            daemon.stop()
            self.servers.pop("policyd")

            self.guarded(("postfwd_ratio",), self.peer)
            self.suite("fork-exec baseline")
            self.forkexec()
            fe = figures["forkexec"]
            ours = figures["closed"]["policyd exim-unix-c8"]["qps"]
            self.measure("forkexec_ratio", ours / fe["c1"]["qps"] if fe["c1"]["qps"] else None,
                         f"{ours:,.0f} vs {fe['c1']['qps']:.1f} q/s (two callers "
                         f"{fe['c2']['qps']:.1f} q/s)", fe["c1"]["errors"])
            self.suite("snapshot builds")
            self.snapshot_builds()
            sb = figures["snapshot_build"]
            self.measure("build_sqlite_s", sb["sqlite_s"],
                         f"{self.data.memberships:,} memberships; PostgreSQL "
                         f"{_fmt(sb['postgresql_s'], '.2f', ' s')}")
            self.guarded(("notify_propagation_ms",), self.pg_propagation)
            self.suite("stages (in-process CPU per request)")
            self.stages()
            self.guarded(("codec_64k_vs_8k",), self.codecs)
            if not self.args.skip_mailman3:
                self.guarded(("mailman3_build_s", "mailman3_notice_s"), self.mailman3)
            else:
                for key in ("mailman3_build_s", "mailman3_notice_s"):
                    self.measure(key, skip="--skip-mailman3")
        self.results["elapsed_s"] = time.monotonic() - wall
        self.results["environment"]["load_after"] = os.getloadavg()
        rows = verdict(self.measurements)
        self.results["verdict"] = [asdict(r) for r in rows]
        text = render_verdict(rows) + "\n\n" + render_details(self.results)
        print()
        print(text)
        (self.state / "results.json").write_text(json.dumps(self.results, indent=1,
                                                            default=str))
        (self.state / "results.md").write_text(text + "\n")
        status = exit_status(rows)
        log(f"\nresults: {self.state / 'results.json'} and {self.state / 'results.md'}; "
            f"whole run {self.results['elapsed_s']:.0f} s; exit status {status}")
        return status


# --- helpers ------------------------------------------------------------------------------------


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _source_revision() -> str:
    """The commit measured, ``+changes`` when the working tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return (head or "unknown") + (" +changes" if dirty else "")


def _source_stamp(*names: str) -> str:
    """A hash of the named bench files and of the store's schema (its migrations): a
    generated store is reused only while neither changed."""
    import hashlib

    digest = hashlib.sha256()
    for name in names:
        digest.update((HERE / name).read_bytes())
    for path in sorted((REPO / "policyd" / "store" / "migrations" / "versions").glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
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


def _moderation_transitions(log_file: Path) -> dict:
    """What SMTP-time moderation did per request, from a daemon's decision lines (their
    `` moderation=<transition>`` field): transition -> count."""
    import re

    counts: dict = {}
    try:
        text = log_file.read_bytes()
    except OSError:
        return counts
    for match in re.finditer(rb" moderation=([a-z-]+)", text):
        name = match.group(1).decode()
        counts[name] = counts.get(name, 0) + 1
    return counts


def _fmt(value, spec=",.0f", suffix="") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _http_get(host: str, port: int, path: str) -> str:
    """The first 4 KiB of an HTTP/1.0 answer (loopback only), or "" on any error."""
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            return s.recv(4096).decode("latin-1")
    except OSError:
        return ""


def render_details(results: dict) -> str:
    """The figures behind the verdict: closed and open loop tables, the rest in lines."""
    f = results["figures"]
    out = []
    closed = f.get("closed")
    if closed:
        out += ["Closed loop (medians; CPU per request is the server's whole process):", "",
                "| server | shape | socket | conc. | q/s | p50 ms | p99 ms | p99.9 ms | "
                "µs CPU/req | errors |", "|---|---|---|---|---|---|---|---|---|---|"]
        for row in closed.values():
            out.append(f"| {row['server']} | {row['shape']} | {row['socket']} | "
                       f"{row['concurrency']} | {row['qps']:,.0f} | {row['p50_ms']:.3f} | "
                       f"{row['p99_ms']:.3f} | {row['p999_ms']:.3f} | "
                       f"{_fmt(row['cpu_us_per_req'], '.0f')} | {row['errors']} |")
    opened = f.get("open")
    if opened:
        out += ["", "Open loop, Poisson arrivals, latency from the scheduled send time "
                "(policyd / bare Twisted with the same lookup; ms; off-CPU: the server's "
                "main thread runnable but not running):", "",
                "| shape | load | rate/s | p50 | p99 | p99.9 | max | p99 ratio | "
                "off-CPU | steal | errors |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for key, row in opened.items():
            shape = key.split("-")[0]

            def pair(name, spec=".2f"):
                return (f"{_fmt(row[f'policyd_{name}'], spec)} / "
                        f"{_fmt(row[f'lookup_{name}'], spec)}")

            out.append(f"| {shape} | {row['fraction']:.0%} | {row['rate']:,.0f} | "
                       f"{pair('p50_ms', '.3f')} | {pair('p99_ms')} | {pair('p999_ms')} | "
                       f"{pair('max_ms', '.1f')} | {_fmt(row['p99_ratio'], '.2f')} | "
                       f"{100 * (row['policyd_off_cpu_share'] or 0):.1f}% / "
                       f"{100 * (row['lookup_off_cpu_share'] or 0):.1f}% | "
                       f"{100 * row['steal_share']:.1f}% | "
                       f"{row['policyd_errors']} / {row['lookup_errors']} |")
    peer = f.get("peer")
    if peer and peer.get("postfwd"):
        out += ["", "Membership job: policyd (envelope, TCP, c=8) "
                f"{peer['policyd_qps']:,.0f} q/s; postfwd: " + "; ".join(
                    f"{name} " + (f"{v['qps']:,.1f} q/s" if "qps" in v else v["error"][:80])
                    for name, v in peer["postfwd"].items()) + "."]
    metrics = f.get("metrics")
    if metrics:
        out += ["", "Metrics on / off, CPU per request at a fixed rate: " + "; ".join(
            f"{shape} {metrics[shape]['on_us']:.0f} / {metrics[shape]['off_us']:.0f} µs "
            f"at {metrics[shape]['rate']:,.0f}/s" for shape in ("exim", "postfix")) + "."]
    eh = f.get("exim_headers")
    if eh:
        mix = eh.get("mix") or {}
        out += ["", "Exim with the message (issue 16; closed loop c=8; headers= of "
                f"{mix.get('header_bytes_min', 0):,}-{mix.get('header_bytes_max', 0):,} B, "
                f"median {mix.get('header_bytes_median', 0):,} B; lines of median "
                f"{mix.get('line_bytes_median', 0):,} B): " + "; ".join(
                    f"{name} {eh[name]['qps']:,.0f} q/s, "
                    f"{_fmt(eh[name]['cpu_us_per_req'], '.0f')} µs CPU/req (today's request "
                    f"without headers: {eh[name]['plain_qps']:,.0f} q/s, "
                    f"{_fmt(eh[name]['plain_cpu_us_per_req'], '.0f')} µs)"
                    for name in ("policyd", "lookup")) + "."]
    moderation = f.get("moderation")
    if moderation and "exim" in moderation and "postfix" in moderation:
        out += ["", "SMTP-time moderation (issue 17), greylist on every list, lookups only, "
                "CPU per request at a fixed rate, on / off: " + "; ".join(
                    f"{shape} {moderation[shape]['on_us']:.0f} / "
                    f"{moderation[shape]['off_us']:.0f} µs at {moderation[shape]['rate']:,.0f}/s "
                    f"(moderation looked at {sum(moderation[shape]['transitions'].values()):,} "
                    "requests)" for shape in ("exim", "postfix")) + "."]
    codecs = f.get("codecs")
    if codecs:
        out += ["", "Codecs (issue 13), in-process parse time per request (µs, and ns per "
                "byte) at " + ", ".join(f"{int(n) // 1024} KB" for n in codecs["sizes"])
                + ": " + "; ".join(
                    f"{name.replace('_', ' ')} " + ", ".join(
                        f"{codecs[name][str(n)]['us']:g} ({codecs[name][str(n)]['ns_per_byte']:g})"
                        for n in codecs["sizes"]) + f", 64 KB / 8 KB {codecs[name]['ratio']:g}"
                    for name in ("exim", "postfix", "postfix_chunked")) + "."]
    pg = f.get("pg_propagation")
    if pg:
        notify, poll = pg["notify"], pg["poll"]
        load = poll["idle_load"]
        out += ["", f"PostgreSQL (issue 12): NOTIFY, {notify['daemons']} daemons, "
                f"{notify['changes']} changes: commit to first reflecting answer, median per "
                f"daemon {', '.join(f'{m:g}' for m in notify['median_ms'])} ms, worst "
                f"{', '.join(f'{m:g}' for m in notify['max_ms'])} ms. Polling load: "
                f"{poll['daemons']} idle daemons (listen_notify off, refresh_interval "
                f"{poll['refresh_interval']:g} s) cost the database "
                f"{load['per_daemon_per_s']:.2f} "
                + ("statements/s each (" if "statements" in load["source"] else
                   f"transactions/s each ({load.get('rollbacks_per_daemon_per_s', 0):.2f}/s "
                   "of them rollbacks; ")
                + f"{load['source']}, over {load['seconds']:g} s)."]
    fe = f.get("forkexec")
    if fe:
        out += ["", f"Fork-exec baseline ({fe['interpreter']} bench/oldcheck.py per query): "
                f"{fe['c1']['qps']:.1f} q/s with one caller (p50 {fe['c1']['p50_ms']:.1f} ms), "
                f"{fe['c2']['qps']:.1f} q/s with two."]
    st = f.get("stages")
    if st:
        out += ["", "Where a request's CPU goes in policyd's own code (µs per request, "
                "in-process, no sockets): "
                f"Exim parse {st['exim_parse_us']:g}, decide {st['exim_decide_warm_us']:g} "
                f"(cold header caches {st['exim_decide_cold_us']:g}), reply+render "
                f"{st['exim_reply_us'] + st['exim_render_us']:.2f}, log line "
                f"{st['log_line_us']:g}; Postfix parse {st['postfix_parse_us']:g}, decide "
                f"{st['postfix_decide_warm_us']:g}, reply+render "
                f"{st['postfix_reply_render_us']:g}"
                + (f", the whole request from a read {st['postfix_request_log_us']:g} "
                   f"({st['postfix_request_nolog_us']:g} without its line)"
                   if "postfix_request_log_us" in st else "") + "."]
    prof = f.get("profile")
    if prof:
        for shape, p in prof.items():
            if p.get("categories"):
                out += ["", f"py-spy, {shape} at concurrency 8 ({p['samples']} samples): "
                        + ", ".join(f"{k} {v:g}%" for k, v in p["categories"].items()) + "."]
    env = results["environment"]
    out += ["", "Load average (1, 5, 15 min) before each suite: " + "; ".join(
        f"{s['suite'].split(' (')[0]} {s['load_average'][0]:.2f} {s['load_average'][1]:.2f} "
        f"{s['load_average'][2]:.2f}" for s in results.get("suites", ())) + "."]
    out += ["", f"Source {env.get('source', 'unknown')}; "
            f"Python {env.get('python')} ({env.get('executable')}), {env.get('cpus')} CPUs, "
            f"kernel {env.get('kernel')}; servers on CPU {SERVER_CPU}, load generator on CPU "
            f"{CLIENT_CPU}; {env.get('runs')} runs of {env.get('duration_s')} s per closed-loop "
            f"figure, {env.get('open_duration_s')} s per open-loop one"
            + ("; QUICK RUN: small stores, the figures mean nothing" if env.get("quick")
               else "") + "."]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench",
                                     description="policyd performance targets (issue 14)")
    parser.add_argument("--state-dir", required=True,
                        help="where the stores, request mixes, logs and results go")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (default 3)")
    parser.add_argument("--duration", type=float, default=2.5,
                        help="seconds measured per closed-loop run (default 2.5, after 0.5 s "
                             "warm-up)")
    parser.add_argument("--open-duration", type=float, default=5.0,
                        help="seconds measured per open-loop run (default 5)")
    parser.add_argument("--quick", action="store_true",
                        help="small stores and one short run: checks the harness, not speed")
    parser.add_argument("--skip-postgresql", action="store_true",
                        help="no PostgreSQL snapshot-build figures")
    parser.add_argument("--mailman-python", metavar="PATH",
                        help="Mailman's interpreter for the Mailman 3 suite "
                             "(make bench passes build/mailman-venv/bin/python)")
    parser.add_argument("--skip-mailman3", action="store_true",
                        help="leave out the Mailman 3 suite (its targets then SKIP)")
    parser.add_argument("--py-spy", metavar="PATH",
                        help="a py-spy binary: also sample the daemon under load")
    parser.add_argument("--no-pause", action="store_true",
                        help="leave the other servers running (not SIGSTOPped) while one "
                             "is measured")
    parser.add_argument("--timeline", action="store_true",
                        help="run the 1M daemon under bench.timeline and record its reactor "
                             "turns in the open-loop runs at 75%%")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs = 1
        args.duration = min(args.duration, 1.0)
        args.open_duration = min(args.open_duration, 2.0)
    if args.mailman_python:
        args.mailman_python = str(Path(args.mailman_python).absolute())
    if (os.cpu_count() or 1) < 2:
        log("bench: warning: one CPU only, server and load generator will share it")
    os.chdir(REPO)
    try:
        return Bench(args).run()
    except SystemExit as error:
        # a harness failure (a server that did not start, a load generator that failed):
        # not a verdict
        if isinstance(error.code, str):
            print(error.code, file=sys.stderr)
            return 2
        raise
    except Exception:  # noqa: BLE001 - any crash of the harness is status 2, not a verdict
        import traceback

        traceback.print_exc()
        print("bench: the harness failed (exit status 2): no verdict", file=sys.stderr)
        return 2
