"""How the command line prints: aligned tables for people, stable JSON for programs.

Why two shapes from one source: each command builds plain data once (money as decimal
strings, exactly as the wire and the models carry it) and hands it to :class:`Output`, which
prints either a table or JSON. So the table and ``--json`` can never disagree on a figure.

What this module must never do: turn money into a ``float`` (percentages and bars are computed
in integers of micro-USDC), print a line that has not passed through
:func:`pf_metered.cli._secrets.scrub`, or write anything but results to stdout (diagnostics go
to stderr, so ``--json`` output stays parseable).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TextIO

from pf_metered.cli._secrets import scrub
from pf_metered.models import Escrow
from pf_metered.money import format_usdc

__all__ = [
    "BAR_WIDTH",
    "Column",
    "Output",
    "escrow_detail",
    "escrow_row",
    "progress_bar",
    "render_kv",
    "render_table",
    "share_text",
    "shown_memo",
]

BAR_WIDTH: Final = 30

_IDEM_TAG: Final = re.compile(r"\s*\[idem:[^\]]*\]\s*$")


@dataclass(frozen=True, slots=True)
class Column:
    """One table column: the key in each row, its heading, and whether it is right-aligned."""

    key: str
    title: str
    right: bool = False
    show: Callable[[Any], str] | None = None


def render_table(columns: Sequence[Column], rows: Iterable[Mapping[str, Any]]) -> str:
    """Rows as a table with a heading line; missing values print as ``-``."""
    cells = [
        [_cell(c.show(row.get(c.key)) if c.show else row.get(c.key)) for c in columns]
        for row in rows
    ]
    widths = [max([len(c.title), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if c.right else v.ljust(w)
            for v, w, c in zip(values, widths, columns, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line([c.title for c in columns])]
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def render_kv(pairs: Sequence[tuple[str, Any]]) -> str:
    """``label  value`` lines with the labels aligned."""
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k.ljust(width)}  {_cell(v)}".rstrip() for k, v in pairs)


def shown_memo(memo: str | None) -> str:
    """A memo for a table: without the client's trailing ``[idem:KEY]`` reconciliation tag."""
    return _IDEM_TAG.sub("", memo or "")


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def share_text(part_micro: int, whole_micro: int) -> str:
    """``part`` as a percentage of ``whole`` with one decimal, computed in integers."""
    if whole_micro <= 0:
        return "0.0%"
    tenths = (part_micro * 1000 + whole_micro // 2) // whole_micro
    return f"{tenths // 10}.{tenths % 10}%"


def progress_bar(
    released_micro: int, refunded_micro: int, amount_micro: int, width: int = BAR_WIDTH
) -> str:
    """``[#####~~~.....]``: ``#`` released to the provider, ``~`` refunded, ``.`` still locked."""
    if amount_micro <= 0:
        return "[" + "." * width + "]"
    done = released_micro * width // amount_micro
    back = (released_micro + refunded_micro) * width // amount_micro - done
    rest = width - done - back
    return "[" + "#" * done + "~" * back + "." * rest + "]"


def escrow_row(escrow: Escrow) -> dict[str, Any]:
    """An escrow's figures as plain data (money as the wire's decimal strings)."""
    return {
        "escrow_id": escrow.escrow_id,
        "status": escrow.status,
        "amount": format_usdc(escrow.amount_micro),
        "released": format_usdc(escrow.released_micro),
        "remaining": format_usdc(escrow.remaining_micro),
        "refunded": format_usdc(escrow.refunded_micro),
        "from_agent_id": escrow.from_agent_id,
        "to_agent_id": escrow.to_agent_id,
        "memo": escrow.memo,
        "auto_release_at": escrow.auto_release_at,
    }


def escrow_detail(escrow: Escrow) -> dict[str, Any]:
    """An escrow with its release history, for ``escrow status`` and ``--json``."""
    data = escrow_row(escrow)
    data["releases"] = [
        {
            "release_id": r.release_id,
            "amount": format_usdc(r.amount_micro),
            "memo": r.memo,
            "created_at": r.created_at,
        }
        for r in escrow.releases
    ]
    data["release_count"] = escrow.total_releases  # v1 reads carry the most recent only
    return data


ESCROW_COLUMNS: Final = (
    Column("escrow_id", "ESCROW"),
    Column("status", "STATUS"),
    Column("amount", "AMOUNT", right=True),
    Column("released", "RELEASED", right=True),
    Column("remaining", "REMAINING", right=True),
    Column("refunded", "REFUNDED", right=True),
    Column("to_agent_id", "PROVIDER"),
    Column("memo", "MEMO", show=shown_memo),
)

RELEASE_COLUMNS: Final = (
    Column("n", "#", right=True),
    Column("amount", "AMOUNT", right=True),
    Column("memo", "MEMO", show=shown_memo),
    Column("created_at", "AT"),
    Column("release_id", "RELEASE"),
)


@dataclass
class Output:
    """Where results and diagnostics go, and in which shape (``json=True`` for ``--json``)."""

    json: bool = False
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)

    def write(self, text: str) -> None:
        """A result line (or block) to stdout."""
        self.out.write(scrub(text) + "\n")
        self.out.flush()

    def data(self, payload: Any, table: str | None = None) -> None:
        """A result: ``payload`` as JSON with ``--json``, else the ``table`` text."""
        if self.json:
            self.write(json.dumps(payload, indent=2, ensure_ascii=False))
        else:
            self.write(table if table is not None else json.dumps(payload, indent=2))

    def note(self, text: str) -> None:
        """A diagnostic for the person at the terminal (stderr; silent under ``--json``)."""
        if not self.json:
            self.err.write(scrub(text) + "\n")
            self.err.flush()

    def error(self, message: str, *, kind: str, code: int, **extra: Any) -> None:
        """A failure to stderr: one ``pf-metered: error:`` line, or a JSON object."""
        message = scrub(message)
        if self.json:
            body: dict[str, Any] = {"error": {"kind": kind, "message": message, "exit_code": code}}
            body["error"].update({k: v for k, v in extra.items() if v is not None})
            self.err.write(scrub(json.dumps(body, ensure_ascii=False)) + "\n")
        else:
            self.err.write(f"pf-metered: error: {message}\n")
        self.err.flush()
