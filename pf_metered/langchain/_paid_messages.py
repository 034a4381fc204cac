"""What a ``pay_per_call`` tool answers when it cannot be paid: the problem and a next step.

Why not :func:`~pf_metered.tools.explain` (here it only names the failure): its steps are
written for the stream tools (``stream_record`` can "record at most the units left"); a paid
tool costs a fixed number of units, so the model's moves are different: open a new stream (the
paid tool pays from the newest one), close the spent one, or ask the user. And a step may name
only a tool the model was given (``offered``): with an unknown tool set, or a stream the
*program* opened (no tool of the model's can act on it), the step needs no tool at all.

What this module must never do: name a tool outside ``offered``, or leave a refusal without a
next step.
"""

from __future__ import annotations

from pf_metered.errors import BudgetExhausted, StreamClosed
from pf_metered.tools import ToolError, explain
from pf_metered.tools.errors import offering

__all__ = ["no_stream", "refused"]


def _units(n: int) -> str:
    return f"{n} unit{'' if n == 1 else 's'}"


def no_stream(tool_name: str, *, provider: str, offered: frozenset[str]) -> ToolError:
    """No open stream pays ``provider``: the call was refused before it ran."""
    if "stream_open" in offered:
        step = f"Open one with stream_open (provider {provider!r}), then call {tool_name} again."
    else:
        step = (
            f"Ask the user to open a payment stream to provider {provider!r} for you; do not "
            f"call {tool_name} again until then."
        )
    return ToolError(
        f"{tool_name} is paid per call and no payment stream to provider {provider!r} is open: "
        "it was not run.",
        next_step=step,
        kind="no_stream",
    )


def refused(
    exc: BaseException,
    *,
    tool_name: str,
    units: int,
    provider: str | None,
    handle: str | None,
    offered: frozenset[str],
) -> ToolError:
    """The stream could not hold ``units`` for ``tool_name`` (``exc``): it was not run.

    ``handle``: the agent's stream (``s1``) that refused, or ``None`` for the program's own
    stream, which no tool of the model's can close or replace.
    """
    label = "the tool's stream" if handle is None else f"stream {handle}"
    costs = f"{tool_name} costs {_units(units)} of {label}; it was not run"
    agents = handle is not None and provider is not None
    can_open = agents and "stream_open" in offered
    can_close = agents and "stream_close" in offered
    if isinstance(exc, BudgetExhausted):
        n = exc.remaining_units
        left = "" if n is None else f" ({_units(n)} left)"
        if can_open and can_close:
            step = (
                f"Close {label} with stream_close, open a new stream to provider {provider!r} "
                f"with stream_open, then call {tool_name} again."
            )
        elif can_open:
            step = (
                f"Open a new stream to provider {provider!r} with stream_open (the newest one "
                f"pays), then call {tool_name} again."
            )
        elif can_close:
            step = (
                f"Close {label} with stream_close and tell the user its budget is spent; do not "
                f"call {tool_name} again until they open a new payment stream."
            )
        else:
            step = (
                f"Tell the user the budget of {label} is spent (they can raise it or open a new "
                f"payment stream); do not call {tool_name} again until then."
            )
        return ToolError(
            f"Budget exhausted{left}: {costs}, and nothing was counted.",
            next_step=step,
            kind="budget_exhausted",
        )
    if isinstance(exc, StreamClosed):
        if can_open:
            step = (
                f"Open a new stream to provider {provider!r} with stream_open, then call "
                f"{tool_name} again."
            )
        else:
            step = (
                f"Tell the user {label} is closed (they can open a new payment stream); do not "
                f"call {tool_name} again until then."
            )
        return ToolError(
            f"{label[0].upper()}{label[1:]} is closed and takes no more units: {costs}.",
            next_step=step,
            kind="stream_closed",
        )
    with offering(frozenset()):  # the problem only: the steps below are a paid tool's
        err = explain(exc, tool_name=tool_name)
    problem = err.problem.rstrip(".")
    if can_open and can_close:
        step = (
            f"Close {label} with stream_close (it settles what was counted), open a new stream "
            f"to provider {provider!r} with stream_open, then call {tool_name} again."
        )
    elif can_open:
        step = (
            f"Open a new stream to provider {provider!r} with stream_open, then call {tool_name} "
            "again; if that fails too, tell the user."
        )
    elif can_close:
        step = (
            f"Close {label} with stream_close and tell the user its payments failed; do not call "
            f"{tool_name} again until they fix it."
        )
    else:
        step = (
            f"Tell the user the payments of {label} failed; do not call {tool_name} again until "
            "they fix it."
        )
    return ToolError(
        f"{label[0].upper()}{label[1:]} takes no calls: its payments failed ({problem}); {costs}.",
        next_step=step,
        kind=err.kind,
    )
