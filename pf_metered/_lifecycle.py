"""Process exit, SIGTERM and fork: the one place pf_metered reacts to them, in explicit phases.

Why one module: a stream that holds money must be dealt with before its store goes away, and
the store before the interpreter does. Several ``atexit`` hooks in several files ran in the
reverse order of their registration (LIFO), so correctness depended on import order. Here one
``atexit`` hook runs the phases in a fixed order, each hook under the same deadline:

1. ``CLOSE``  — streams this process opened that nothing else could ever finish are closed
   (``@metered``'s own streams; streams on an in-memory store): last partial batch paid, the
   rest refunded, exactly as ``close()`` does.
2. ``FLUSH``  — every other live stream sends the batches that are due (what cannot be sent in
   time stays journaled in its durable store for ``resume``).
3. ``REPORT`` — a stream still open is logged at WARNING with its escrow id, its store and the
   commands that free the locked money (``PaymentStream.resume(...).close()``, or
   ``pf-metered escrow refund ESCROW_ID``): money is never locked silently.
4. ``STORES`` — stores make what they buffered durable and give their leases back.

SIGTERM (a handler is installed only when the main thread asks and SIGTERM still has its
default action; ``PF_METERED_SIGTERM=0`` opts out) runs the same phases, then restores the
default action and re-raises the signal, so the process still dies of SIGTERM. A forked child
runs the ``FORK`` hooks (stores drop their parent's connections and leases) and forgets the
parent's streams: they are the parent's to close, never the child's.

The whole exit is bounded by ``PF_METERED_EXIT_TIMEOUT`` seconds (default 5): the phases run
on a helper thread that the exit waits for at most that long.

What this module must never do: import anything of pf_metered (every layer may use it), block
exit past its deadline, or let one failing hook stop the others.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import threading
import weakref
from collections.abc import Callable
from typing import Final, Literal

__all__ = [
    "CLOSE",
    "FLUSH",
    "FORK",
    "PHASES",
    "REPORT",
    "STORES",
    "exit_timeout",
    "forget",
    "install_sigterm",
    "on",
    "run_exit",
    "track",
    "tracked",
]

log = logging.getLogger("pf_metered.stream")

Phase = Literal["close", "flush", "report", "stores", "fork"]
CLOSE: Final = "close"
FLUSH: Final = "flush"
REPORT: Final = "report"
STORES: Final = "stores"
FORK: Final = "fork"
PHASES: Final[tuple[Phase, ...]] = (CLOSE, FLUSH, REPORT, STORES)
"""The exit phases, in the order they run."""

_hooks: dict[str, list[Callable[[], None]]] = {p: [] for p in (*PHASES, FORK)}
_lock = threading.Lock()
_streams: dict[str, weakref.WeakSet[object]] = {CLOSE: weakref.WeakSet(), FLUSH: weakref.WeakSet()}
_ran = False


def on(phase: Phase, hook: Callable[[], None]) -> None:
    """Run ``hook`` in ``phase`` (once per hook, however often it is registered)."""
    if phase not in _hooks:
        raise ValueError(f"unknown phase {phase!r}")
    with _lock:
        if hook not in _hooks[phase]:
            _hooks[phase].append(hook)


def track(stream: object, *, close_at_exit: bool) -> None:
    """Remember an opened stream: closed at exit (``close_at_exit``), else flushed and, if
    still open, reported. Weakly held: a stream that is garbage-collected is forgotten."""
    with _lock:
        if close_at_exit:
            _streams[FLUSH].discard(stream)
            _streams[CLOSE].add(stream)
        elif stream not in _streams[CLOSE]:  # once promised a close at exit, it keeps it
            _streams[FLUSH].add(stream)


def forget(stream: object) -> None:
    """Stop tracking ``stream`` (it is closed, or belongs to a process that is gone)."""
    with _lock:
        for group in _streams.values():
            group.discard(stream)


def tracked(kind: Literal["close", "flush"]) -> list[object]:
    """The live streams of one kind (for the phase hooks)."""
    with _lock:
        return list(_streams[kind])


def exit_timeout() -> float:
    """Seconds exit may spend in the phases (``PF_METERED_EXIT_TIMEOUT``, default 5)."""
    try:
        value = float(os.environ.get("PF_METERED_EXIT_TIMEOUT", "5"))  # ok: seconds
    except ValueError:
        return 5.0
    return value if 0 <= value <= 600 else 5.0


def _run_phases() -> None:
    for phase in PHASES:
        with _lock:
            hooks = list(_hooks[phase])
        for hook in hooks:
            try:
                hook()
            except Exception:  # the other hooks still run; the journal keeps the rest
                log.exception("pf_metered: exit phase %s: a hook failed", phase)


def run_exit(timeout: float | None = None) -> bool:
    """Run the exit phases within ``timeout`` seconds (default :func:`exit_timeout`).

    Returns ``True`` when every phase finished in time. Safe to call more than once: each
    phase's hooks decide what is left to do (a closed stream is skipped).
    """
    limit = exit_timeout() if timeout is None else timeout
    worker = threading.Thread(target=_run_phases, name="pf-metered-exit", daemon=True)
    worker.start()
    worker.join(limit)
    if worker.is_alive():
        log.warning("pf_metered: exit took more than %.1f s; the rest stays journaled", limit)
        return False
    return True


def _at_exit() -> None:
    global _ran  # noqa: PLW0603 - once per process
    if _ran:
        return
    _ran = True
    run_exit()


def _on_sigterm(signum: int, frame: object) -> None:
    run_exit()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def install_sigterm() -> None:
    """Flush on SIGTERM too (see the module docstring); a no-op off the main thread."""
    if os.environ.get("PF_METERED_SIGTERM", "1") == "0":
        return
    if threading.current_thread() is not threading.main_thread():
        return
    with contextlib.suppress(ValueError, OSError):
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)


def _after_fork_in_child() -> None:
    global _lock  # noqa: PLW0603 - the parent's lock may have been held at fork
    _lock = threading.Lock()
    for group in _streams.values():
        group.clear()
    for hook in list(_hooks[FORK]):
        try:
            hook()
        except Exception:
            log.exception("pf_metered: a fork hook failed in the child")


atexit.register(_at_exit)
os.register_at_fork(after_in_child=_after_fork_in_child)
