"""A log that takes no more writes (a full pipe, a hung journald, a disk that stalls)
never stops the answers: the reactor hands its lines to a writer thread
(``policyd.logfile``), and they are written once the log moves again."""

from __future__ import annotations

import os
import time

import subprocess

from .conftest import LIST, MEMBER, NONMEMBER, Daemon, PostfixClient


class _PipedDaemon(Daemon):
    """``policyd`` with its standard output (its log: no ``log_file``) into a pipe."""

    def start(self, stdout_fd: int) -> "_PipedDaemon":
        self.output = open(self.output_path, "ab")
        self.proc = subprocess.Popen(self.command, stdout=stdout_fd, stderr=self.output,
                                     cwd=self.run.path)
        return self


def test_answers_go_on_while_standard_output_is_stuck(run):
    """The ``policyd`` command logging to standard output, a pipe that stops being read
    (``twist`` writes its own standard output itself; policyd's ``log_file`` must be a
    regular file, where the writer thread does the same, tested in tests/test_logfile.py)."""
    reader, writer = os.pipe()
    run.write_config(extra="mode = envelope\n")  # [postfix]: membership answers
    run.fill()
    daemon = _PipedDaemon(run, launcher="policyd").start(writer)
    os.close(writer)
    try:
        # Nothing reads the pipe until the end: the daemon's writes fill it (64 KiB)
        # within a few hundred decision lines, then block.
        daemon.wait_ready()
        client = PostfixClient(run.postfix_socket, timeout=10)
        count = 3000  # several hundred KB of decision lines
        started = time.monotonic()
        for i in range(count):
            sender = MEMBER if i % 2 else NONMEMBER
            answer = client.ask(LIST, sender)
            assert answer.startswith(b"action=") and (
                (answer == b"action=DUNNO") == (sender == MEMBER)), answer
        assert time.monotonic() - started < 60
        assert daemon.status()["snapshot"]
        client.close()

        # The log moves again: every decision line arrives, in order.
        os.set_blocking(reader, False)
        got = b""
        deadline = time.monotonic() + 30
        while got.count(b"[policyd.decision] postfix ") < count and time.monotonic() < deadline:
            try:
                chunk = os.read(reader, 1 << 16)
            except BlockingIOError:
                time.sleep(0.05)
                continue
            got += chunk
        decisions = [line for line in got.decode().splitlines()
                     if "[policyd.decision] postfix " in line]
        assert len(decisions) == count
        assert [f"sender=<{NONMEMBER}>" in line for line in decisions[:4]] == \
            [True, False, True, False]
        assert "left out" not in got.decode()
    finally:
        daemon.cleanup()
        os.close(reader)
