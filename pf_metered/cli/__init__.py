"""The ``pf-metered`` command line (filled in by the CLI issue)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pf-metered``."""
    raise SystemExit("pf-metered: no commands yet")
