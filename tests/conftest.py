"""Suite-wide hooks."""

from .reporting import LINES


def pytest_terminal_summary(terminalreporter):
    if LINES:
        terminalreporter.section("figures reported by the tests")
        for line in LINES:
            terminalreporter.write_line(line)
