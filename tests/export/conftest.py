"""Export fixtures' shared record: agreement and size figures measured by the tests, printed after the run."""

from __future__ import annotations

MEASUREMENTS: list[str] = []


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the figures the export tests measured (the README quotes them)."""
    if MEASUREMENTS:
        terminalreporter.section("export agreement with the service")
        for line in MEASUREMENTS:
            terminalreporter.write_line(line)
