"""Fault suite 1: the server applies a POST, then its answer is lost (timeout, reset, 500).

Hundreds of seeded schedules (``scripts/reliability.py`` runs thousands): after close, the
escrow released exactly rate × units, nothing twice, and released + refunded = budget.
"""

from __future__ import annotations

import os

import pytest
from faultkit import run_lost_responses

from pf_metered.sandbox import Sandbox

SCHEDULES = int(os.environ.get("PFM_FAULT_SCHEDULES", "300"))


@pytest.mark.parametrize("chunk", range(6))
def test_lost_responses_lose_nothing_and_pay_nothing_twice(chunk: int) -> None:
    per = SCHEDULES // 6
    injected = 0
    with Sandbox() as sandbox:
        for seed in range(chunk * per, (chunk + 1) * per):
            figures = run_lost_responses(seed, sandbox)
            assert figures["lost"] == 0, (seed, figures)
            assert figures["doubled"] == 0, (seed, figures)
            assert figures["budget_gap"] == 0, (seed, figures)
            assert figures["receipt_gap"] == 0, (seed, figures)
            injected += figures["injected"]
        sandbox.audit()
    assert injected > per  # the schedules did inject faults
