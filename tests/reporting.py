"""Figures a test wants in the run's output (agreement sizes, live-change delays): pytest
captures a passing test's prints, so these are shown again in the terminal summary."""

from __future__ import annotations

LINES: list[str] = []


def report(text: str) -> None:
    text = text.strip("\n")
    print(text)
    LINES.append(text)
