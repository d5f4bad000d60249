"""``python -m bench.readme``: the docs' benchmark results regenerated from results.json.

Fast and untimed: two made-up runs and two small made-up docs in ``tmp_path`` (the real
README.md and bench/README.md are never touched), the generator's ``main`` run on them.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone

import pytest

from bench.readme import main

ROWS = [
    ("exim_c8", "Exim closed loop c=8: policyd / constant", ">= 0.6 x"),
    ("tail_ms", "Exim open loop at 50% of max: policyd p99.9", "<= 5 ms"),
    ("notify_ms", "Change propagation with NOTIFY", "<= 100 ms"),
]
RUN1 = [("0.61 x (policyd 17,591 q/s, constant 28,608)", "PASS"),
        ("8.82 ms (8,795/s; p99 4.24 ms)", "FAIL"),
        ("skipped: --skip-postgresql", "SKIP")]
RUN2 = [("0.70 x (policyd 19,000 q/s, constant 27,100)", "PASS"),
        ("4.10 ms (10,768/s; p99 1.57 ms)", "PASS"),
        ("42.1 ms (medians per daemon 37, 42, 34 ms)", "PASS")]
# 2026-12-06 20:49 and 21:22 UTC
WRITTEN1 = datetime(2026, 12, 6, 20, 49, 30, tzinfo=timezone.utc).timestamp()
WRITTEN2 = datetime(2026, 12, 6, 21, 22, 5, tzinfo=timezone.utc).timestamp()

README = """# policyd

Intro, not generated.

## Performance

Hand-written paragraph.

<!-- bench:summary:start -->
(generated after the next `make bench` runs)
<!-- bench:summary:end -->

## Development

After the markers.
"""

BENCH_README = """# Performance: method and results

## Latest run

<!-- bench:runs:start -->

Hand-pasted runs.

<!-- bench:runs:end -->

## Against 8cd0501

Left alone.
"""


def results(path, measured, *, source="d609384abcde", quick=False, written=WRITTEN1,
            load=0.56, elapsed=755.4):
    path.mkdir(parents=True, exist_ok=True)
    verdict = [{"key": key, "label": label, "measured": m, "target": limit, "result": r}
               for (key, label, limit), (m, r) in zip(ROWS, measured)]
    data = {"verdict": verdict, "elapsed_s": elapsed, "figures": {},
            "environment": {"source": source, "python": "3.11.2", "cpus": 2,
                            "kernel": "6.1", "load_before": [load, 0.3, 0.1],
                            "load_after": [1.0, 0.5, 0.2], "quick": quick, "runs": 3,
                            "duration_s": 10.0}}
    target = path / "results.json"
    target.write_text(json.dumps(data, indent=1))
    os.utime(target, (written, written))
    return path


@pytest.fixture(autouse=True)
def not_utc(monkeypatch):
    """A local zone far from UTC, so that a time given in local time shows."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def docs(tmp_path):
    readme, bench_readme = tmp_path / "README.md", tmp_path / "bench-README.md"
    readme.write_text(README)
    bench_readme.write_text(BENCH_README)
    return readme, bench_readme


@pytest.fixture
def runs(tmp_path):
    return (results(tmp_path / "run1", RUN1),
            results(tmp_path / "run2", RUN2, written=WRITTEN2, load=1.25, elapsed=775.0))


def generate(docs, *args):
    readme, bench_readme = docs
    return main(["--readme", str(readme), "--bench-readme", str(bench_readme),
                 *map(str, args)])


def between(text, start, end):
    return text.split(start + "\n", 1)[1].split(end + "\n", 1)[0]


def outside(text, start, end):
    head, rest = text.split(start + "\n", 1)
    return head + rest.split(end + "\n", 1)[1]


def test_the_bench_readme_gets_a_sentence_and_the_verdict_table_per_run(docs, runs):
    assert generate(docs, *runs) == 0
    text = docs[1].read_text()
    part = between(text, "<!-- bench:runs:start -->", "<!-- bench:runs:end -->")
    prose = " ".join(part.split("**d609384abcde, run 1")[0].split())
    assert ("Run 1 at d609384abcde, results.json written 2026-12-06 20:49 UTC: 1 PASS, "
            "1 FAIL, 1 SKIP, so exit status 1; load average 0.56 before it, 755 s in all."
            ) in prose
    assert ("Run 2 at d609384abcde, results.json written 2026-12-06 21:22 UTC: 3 PASS, "
            "0 FAIL, 0 SKIP, so exit status 0; load average 1.25 before it, 775 s in all."
            ) in prose
    lines = part.split("\n")
    head = lines.index("**d609384abcde, run 1 (1 PASS, 1 FAIL):**")
    assert lines[head + 2:head + 8] == [
        "| target | measured | limit | result |",
        "|---|---|---|---|",
        "| Exim closed loop c=8: policyd / constant | 0.61 x (policyd 17,591 q/s, "
        "constant 28,608) | >= 0.6 x | PASS |",
        "| Exim open loop at 50% of max: policyd p99.9 | 8.82 ms (8,795/s; p99 4.24 ms) "
        "| <= 5 ms | FAIL |",
        "| Change propagation with NOTIFY | skipped: --skip-postgresql | <= 100 ms | SKIP |",
        ""]
    assert lines[head + 8] == "1 PASS, 1 FAIL, 1 SKIP: targets missed, exit status 1"
    second = lines.index("**d609384abcde, run 2 (3 PASS, 0 FAIL):**")
    assert second > head
    assert ("| Change propagation with NOTIFY | 42.1 ms (medians per daemon 37, 42, 34 ms) "
            "| <= 100 ms | PASS |") in lines[second:]
    assert "Hand-pasted runs." not in text
    assert outside(text, "<!-- bench:runs:start -->", "<!-- bench:runs:end -->") == \
        outside(BENCH_README, "<!-- bench:runs:start -->", "<!-- bench:runs:end -->")


def test_the_readme_gets_one_row_per_target_and_a_column_per_run(docs, runs):
    assert generate(docs, *runs) == 0
    text = docs[0].read_text()
    part = between(text, "<!-- bench:summary:start -->", "<!-- bench:summary:end -->")
    table = [line for line in part.split("\n") if line.startswith("|")]
    assert table == [
        "| target | limit | run 1 | run 2 |",
        "|---|---|---|---|",
        "| Exim closed loop c=8: policyd / constant | >= 0.6 x | 0.61 x, PASS | 0.70 x, PASS |",
        "| Exim open loop at 50% of max: policyd p99.9 | <= 5 ms | 8.82 ms, FAIL "
        "| 4.10 ms, PASS |",
        "| Change propagation with NOTIFY | <= 100 ms | skipped: --skip-postgresql, SKIP "
        "| 42.1 ms, PASS |"]
    prose = " ".join(part.split("|")[0].split())
    assert ("run 1: d609384abcde, 2026-12-06 20:49 UTC; run 2: d609384abcde, "
            "2026-12-06 21:22 UTC") in prose
    assert ("Generated by `python -m bench.readme` from those runs' results.json; "
            "do not edit by hand.") in prose
    assert "(generated after the next" not in text
    assert outside(text, "<!-- bench:summary:start -->", "<!-- bench:summary:end -->") == \
        outside(README, "<!-- bench:summary:start -->", "<!-- bench:summary:end -->")


def test_a_second_run_changes_nothing_and_check_agrees(docs, runs, capsys):
    assert generate(docs, "--check", *runs) == 1       # still the hand-written text
    assert docs[0].read_text() == README and docs[1].read_text() == BENCH_README
    assert generate(docs, *runs) == 0
    first = [p.read_text() for p in docs]
    stamps = [p.stat().st_mtime_ns for p in docs]
    assert generate(docs, *runs) == 0
    assert [p.read_text() for p in docs] == first
    assert [p.stat().st_mtime_ns for p in docs] == stamps   # not even rewritten
    assert generate(docs, "--check", *runs) == 0
    # a results.json argument works as well as its directory
    assert generate(docs, "--check", runs[0] / "results.json", runs[1]) == 0


def test_check_fails_when_a_run_changes_and_writes_nothing(docs, runs, tmp_path):
    assert generate(docs, *runs) == 0
    before = [p.read_text() for p in docs]
    results(tmp_path / "run2", [RUN2[0], ("5.20 ms (9,000/s; p99 3.1 ms)", "FAIL"), RUN2[2]],
            written=WRITTEN2, load=1.25, elapsed=775.0)
    assert generate(docs, "--check", *runs) == 1
    assert [p.read_text() for p in docs] == before
    # and the other way round: fewer runs than the docs show
    assert generate(docs, "--check", runs[0]) == 1


@pytest.mark.parametrize("which", [0, 1])
def test_a_missing_marker_is_exit_status_2_and_nothing_is_written(docs, runs, which,
                                                                 capsys):
    marker = ["<!-- bench:summary:end -->", "<!-- bench:runs:start -->"][which]
    docs[which].write_text(docs[which].read_text().replace(marker + "\n", ""))
    before = [p.read_text() for p in docs]
    assert generate(docs, *runs) == 2
    assert [p.read_text() for p in docs] == before
    err = capsys.readouterr().err
    assert str(docs[which]) in err and marker in err


def test_a_quick_run_is_refused_unless_allowed(docs, tmp_path, capsys):
    quick = results(tmp_path / "quick", RUN1, quick=True)
    assert generate(docs, quick) == 2
    assert "--quick" in capsys.readouterr().err
    assert docs[0].read_text() == README and docs[1].read_text() == BENCH_README
    assert generate(docs, "--allow-quick", quick) == 0
    assert "a --quick run" in " ".join(docs[1].read_text().split())


def test_a_file_that_is_not_a_results_json_is_exit_status_2(docs, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text('{"verdict": []}')
    assert generate(docs, bad) == 2
    assert generate(docs, tmp_path / "nowhere") == 2
    assert "not a `make bench` results.json" in capsys.readouterr().err
