"""The typed user program (tests/typed_user_program.py) also runs, and its receipts are exact.

scripts/test checks it with ``mypy --strict``; here it must do what its types say."""

from __future__ import annotations

from typed_user_program import main


def test_the_typed_user_program_runs_and_pays_exactly() -> None:
    sync, async_, own = main()
    assert (sync.units, sync.paid_micro, sync.refunded_micro) == (18, 18_000, 982_000)
    assert (async_.units, async_.paid_micro, async_.refunded_micro) == (5, 5_000, 995_000)
    assert (own.units, own.paid_micro, own.refunded_micro) == (2, 2_000, 998_000)
