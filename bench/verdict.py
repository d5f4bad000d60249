"""The targets of ``make bench`` and its verdict: one table, PASS / FAIL / SKIP per target,
and the exit status (issue 14).

Pure: no sockets, no processes, no clock; ``bench.runner`` measures and hands in a
``Measurement`` per target key, ``judge`` compares, ``exit_status`` says what ``make``
gets.  A target is missed (FAIL) when its figure is on the wrong side of the limit, when
the runs behind it had errors, when it was not measured at all, or when it was skipped
although it may not be.  Only targets marked ``skippable`` (a peer that cannot be
installed, a feature not in the tree yet) may be SKIP, and only with a reason, which the
table prints.

Ratios are taken against references measured in the same run (the constant-answer and
the same-lookup bare Twisted servers, postfwd, the fork-exec script, the same daemon on a
small store), so that a disturbance of the host hits both sides; the few absolute targets
(memory, tail in milliseconds, build and propagation times) are the ones that only make
sense as such.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
_COMPARE = {">=": lambda v, limit: v >= limit, "<=": lambda v, limit: v <= limit,
            ">": lambda v, limit: v > limit, "<": lambda v, limit: v < limit}


@dataclass(frozen=True)
class Target:
    key: str
    label: str
    op: str            # ">=", "<=", "<" or ">"
    limit: float
    unit: str          # "x", "ms", "s", "B"
    skippable: bool = False

    def text(self) -> str:
        unit = {"x": " x", "ms": " ms", "s": " s", "B": " B"}[self.unit]
        return f"{self.op} {self.limit:g}{unit}"

    def met(self, value: float) -> bool:
        compare = _COMPARE.get(self.op)
        if compare is None:
            raise ValueError(f"unknown comparison {self.op!r}")
        return compare(value, self.limit)


@dataclass(frozen=True)
class Measurement:
    """What the runner measured for one target: ``value`` in the target's unit,
    ``detail`` the figures behind it (printed), ``errors`` in the runs behind it, and
    ``skip``: why it could not be measured (only for a skippable target)."""

    value: float | None = None
    detail: str = ""
    errors: int = 0
    skip: str | None = None


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    measured: str
    target: str
    result: str


TARGETS: tuple[Target, ...] = (
    Target("exim_c8_vs_constant",
           "Exim closed loop c=8: policyd / constant-answer refserver", ">=", 0.6, "x"),
    Target("postfix_c8_vs_constant",
           "Postfix closed loop c=8, envelope mode: policyd / constant-answer refserver",
           ">=", 0.6, "x"),
    Target("exim_open75_p99_vs_lookup",
           "Exim open loop at 75% of max: policyd p99 / bare Twisted (same lookup) p99",
           "<=", 2.0, "x"),
    Target("postfix_open75_p99_vs_lookup",
           "Postfix open loop at 75% of max (envelope): policyd p99 / bare Twisted "
           "(same lookup) p99", "<=", 2.0, "x"),
    Target("exim_open50_p999_ms", "Exim open loop at 50% of max: policyd p99.9",
           "<=", 5.0, "ms"),
    Target("postfix_open50_p999_ms",
           "Postfix open loop at 50% of max (envelope): policyd p99.9", "<=", 5.0, "ms"),
    Target("postfwd_ratio",
           "Membership job (100 lists x 1,000 members, Postfix c=8): policyd / best postfwd",
           ">=", 50, "x", skippable=True),
    Target("forkexec_ratio", "Exim c=8: policyd / fork-exec script (one caller)",
           ">=", 150, "x"),
    Target("bytes_per_membership", "Memory per membership at 1M memberships", "<=", 100, "B"),
    Target("exim_scale_1m_vs_10k", "Exim c=8 throughput: 1M memberships / 10k memberships",
           ">=", 0.9, "x"),
    Target("postfix_scale_1m_vs_10k",
           "Postfix c=8 throughput (envelope): 1M memberships / 10k memberships",
           ">=", 0.9, "x"),
    Target("exim_headers_c8_vs_lookup",
           "Exim closed loop c=8 with a 2-4 KB header block (headers=, body=): policyd / "
           "same-lookup refserver", ">=", 0.45, "x"),
    Target("metrics_cpu_ratio",
           "CPU per request at a fixed rate: [metrics] listen on / off", "<=", 1.05, "x",
           skippable=True),
    Target("moderation_cpu_ratio",
           "CPU per request at a fixed rate: smtp_moderation = greylist on every list "
           "(lookups only) / off", "<=", 1.05, "x"),
    Target("codec_64k_vs_8k",
           "Codec parse time, 64 KB / 8 KB request (worst of Exim, Postfix; linear = 8)",
           "<=", 10.0, "x"),
    Target("build_sqlite_s", "Snapshot build from SQLite, 1M memberships", "<=", 8.0, "s"),
    Target("rebuild_worst_ms", "Worst query while the daemon rebuilds under load",
           "<=", 20.0, "ms"),
    Target("propagation_s", "Change propagation after policyctl (refresh_interval + 0.5 s)",
           "<=", 2.5, "s"),
    Target("notify_propagation_ms",
           "Change propagation with NOTIFY, 3 daemons on one PostgreSQL: commit -> first "
           "answer (median, worst daemon)", "<=", 100.0, "ms", skippable=True),
    Target("mailman3_build_s", "Mailman 3 database, 200k memberships: snapshot build "
           "(worse of SQLite, PostgreSQL)", "<", 15.0, "s", skippable=True),
    Target("mailman3_notice_s", "Mailman 3 subscription -> daemon answers (worse database)",
           "<=", 2.0, "s", skippable=True),
)

def _number(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def judge(target: Target, measurement: Measurement | None) -> Row:
    """One row of the table."""
    def row(measured: str, result: str) -> Row:
        return Row(target.key, target.label, measured, target.text(), result)

    if measurement is None:
        return row("not measured", FAIL)
    if measurement.skip is not None:
        if target.skippable:
            return row(f"skipped: {measurement.skip}", SKIP)
        return row(f"not measured: {measurement.skip}", FAIL)
    value = measurement.value
    if value is None or not isinstance(value, (int, float)) or math.isnan(value):
        return row(measurement.detail or "no figure", FAIL)
    unit = {"x": " x", "ms": " ms", "s": " s", "B": " B"}[target.unit]
    measured = f"{_number(value)}{unit}"
    if measurement.detail:
        measured += f" ({measurement.detail})"
    if measurement.errors:
        return row(f"{measured}; {measurement.errors} errors", FAIL)
    return row(measured, PASS if target.met(value) else FAIL)


def verdict(measurements: dict[str, Measurement],
            targets: tuple[Target, ...] = TARGETS) -> list[Row]:
    """A row per target, in the targets' order; a measurement for an unknown key is an
    error in the runner, not something to ignore."""
    unknown = set(measurements) - {t.key for t in targets}
    if unknown:
        raise KeyError(f"measurements for no target: {', '.join(sorted(unknown))}")
    return [judge(t, measurements.get(t.key)) for t in targets]


def exit_status(rows: list[Row]) -> int:
    """0 when every target passed (or was allowed to skip), 1 when any was missed."""
    return 1 if any(r.result == FAIL for r in rows) else 0


def render(rows: list[Row]) -> str:
    out = ["| target | measured | limit | result |", "|---|---|---|---|"]
    out += [f"| {r.label} | {r.measured} | {r.target} | {r.result} |" for r in rows]
    failed = sum(r.result == FAIL for r in rows)
    skipped = sum(r.result == SKIP for r in rows)
    out.append("")
    out.append(f"{len(rows) - failed - skipped} PASS, {failed} FAIL, {skipped} SKIP: "
               + ("every target met" if not failed else "targets missed, exit status 1"))
    return "\n".join(out)
