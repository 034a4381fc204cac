"""The short sentence a model reads for a tool's answer; the figures themselves stay a dict.

Why prose beside the figures: a LangChain tool answers with ``(content, artifact)``; the model
reads only ``content``, the program reads the ``artifact`` (the answer's dict, money as decimal
strings). A sentence costs the model fewer tokens than the JSON and says what it needs to act
on: the ids it must pass back (``s1``, the escrow id), the state, and the amounts with their
unit. Every id and amount the next call could need is in the sentence; the rest (fees split
out, per-release memos) is in the artifact.

What this module must never do: compute money (figures arrive formatted by the tools), drop
an id the model must copy, or fail on an answer it does not know (unknown tools get the JSON).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pf_metered.tools._base import Answer, render

__all__ = ["summarize"]

_MAX_ROWS = 10


def _usdc(value: Any) -> str:
    return f"{value} USDC"


def _n(count: Any, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _memo(answer: Mapping[str, Any]) -> str:
    memo = answer.get("memo")
    return f", memo {memo!r}" if memo else ""


# -- streams -------------------------------------------------------------------------------


def _stream_state(a: Mapping[str, Any]) -> str:
    """A stream's figures: open streams by units and budget, closed ones by their receipt."""
    if a.get("status") == "closed" and "paid" in a:
        return _receipt(a)
    left = a.get("units_left")
    left_text = "no unit limit" if left is None else f"{_n(left, 'unit')} left"
    unreleased = a.get("unreleased_units") or 0
    pending = (
        f"; {_n(unreleased, 'unit')} counted but not yet paid (paid in batches)"
        if unreleased
        else ""
    )
    return (
        f"stream {a['stream_id']} to {a['provider']} ({a['status']}, {a['rate']} USDC per "
        f"unit): {_n(a['units'], 'unit')} counted, {left_text}; budget {_usdc(a['budget'])}, "
        f"released {_usdc(a['released'])}, remaining {_usdc(a['remaining'])}{pending} "
        f"(escrow {a.get('escrow_id')})."
    )


def _receipt(a: Mapping[str, Any]) -> str:
    parts = [
        f"stream {a['stream_id']} to {a['provider']} (closed): {_n(a['units'], 'unit')}, paid "
        f"{_usdc(a['paid'])} (fee {a['fee']}, provider got {a['provider_net']}), refunded "
        f"{_usdc(a['refunded'])} of the {_usdc(a['budget'])} budget (escrow {a.get('escrow_id')})"
    ]
    for key, words in (
        ("auto_released", "released by the service's timeout"),
        ("kept_by_service", "kept by the service"),
        ("unpaid", "counted but not paid"),
        ("debited", "your balance went down by"),
    ):
        if key in a:
            parts.append(f"{words} {_usdc(a[key])}")
    text = "; ".join(parts) + "."
    if "still_locked" in a:
        held = "; ".join(
            f"{h['escrow_id']} holds {_usdc(h['amount'])} until {h['until']}"
            + ("" if h.get("returns") is None else f" ({h['returns']} comes back to you)")
            for h in a.get("still_locked_escrows", ())
        )
        text += f" Still locked: {_usdc(a['still_locked'])} ({held})."
    for note in a.get("notes", ()):
        text += f" Note: {note}"
    return text


def _opened(a: Answer) -> str:
    return "Opened " + _stream_state(a)


def _status(a: Answer) -> str:
    return _capital(_stream_state(a))


def _recorded(a: Answer) -> str:
    return f"Recorded {_n(a['recorded'], 'unit')}; " + _stream_state(a)


def _stream_list(a: Answer) -> str:
    rows = a.get("streams", [])
    head = (
        f"{_n(a.get('open_streams', 0), 'stream')} open; this session has {_usdc(a.get('locked'))} "
        f"locked, {_usdc(a.get('paid'))} paid, {_usdc(a.get('refunded'))} refunded"
    )
    if a.get("unsettled_creates"):
        head += f"; {a['unsettled_creates']} creates whose outcome is not yet known"
    if not rows:
        return head + ". No streams to list."
    listed = "; ".join(_stream_row(r) for r in rows[-_MAX_ROWS:])
    more = f" (the newest {_MAX_ROWS} of {len(rows)})" if len(rows) > _MAX_ROWS else ""
    return f"{head}. Streams{more}: {listed}."


def _stream_row(r: Mapping[str, Any]) -> str:
    """One row of stream_list: an open stream by what it released, a closed one by its money."""
    text = f"{r['stream_id']} to {r['provider']} ({r['status']}): {_n(r['units'], 'unit')}, budget "
    text += f"{r['budget']}"
    for key in ("released", "paid", "refunded", "still_locked"):
        if key in r:
            text += f", {key.replace('_', ' ')} {r[key]}"
    return text


# -- escrows -------------------------------------------------------------------------------


def _escrow_line(a: Mapping[str, Any]) -> str:
    return (
        f"escrow {a['escrow_id']} for {a['to_agent_id']} ({a['status']}): amount "
        f"{_usdc(a['amount'])}, released {a['released']}, remaining {a['remaining']}, refunded "
        f"{a['refunded']}{_memo(a)}"
    )


def _created(a: Answer) -> str:
    return f"Created {_escrow_line(a)}."


def _released(a: Answer) -> str:
    return f"Released {_usdc(a['released_now'])} now; {_escrow_line(a)}."


def _refunded(a: Answer) -> str:
    return f"Refunded {_usdc(a['refunded_now'])} to you; {_escrow_line(a)}."


def _escrow_status(a: Answer) -> str:
    text = _capital(_escrow_line(a)) + f"; {_n(a.get('releases', 0), 'release')}"
    last = a.get("last_releases") or []
    if last:
        text += " (latest: " + ", ".join(
            r["amount"] + (f" {r['memo']!r}" if r.get("memo") else "") for r in last
        )
        text += ")"
    return text + "."


def _escrow_list(a: Answer) -> str:
    rows = a.get("escrows", [])
    if not rows:
        return "No escrows found."
    shown = f", showing the newest {a['shown']}" if "shown" in a else ""
    return (
        f"{_n(a['count'], 'escrow')} (newest first{shown}): "
        + "; ".join(_escrow_line(r) for r in rows)
        + "."
    )


def _claimed(a: Answer) -> str:
    return f"Faucet claimed: {_usdc(a['credited'])} credited (claim {a['claim_id']})."


_BY_TOOL: dict[str, Callable[[Answer], str]] = {
    "stream_open": _opened,
    "stream_status": _status,
    "stream_record": _recorded,
    "stream_close": _status,
    "stream_list": _stream_list,
    "escrow_create": _created,
    "escrow_release": _released,
    "escrow_status": _escrow_status,
    "escrow_list": _escrow_list,
    "escrow_refund": _refunded,
    "faucet_claim": _claimed,
}


def summarize(tool_name: str, answer: Answer) -> str:
    """The sentence for ``tool_name``'s ``answer``; the compact JSON for a tool or a shape this
    module does not know (a missing figure must never turn an answer into an error)."""
    make = _BY_TOOL.get(tool_name)
    if make is None:
        return render(answer)
    try:
        return make(answer)
    except (KeyError, TypeError):
        return render(answer)
