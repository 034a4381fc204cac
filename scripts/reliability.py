"""The long fault suite: thousands of lost-response schedules, hundreds of killed processes.

Prints the figures the closing note quotes: schedules tried, faults injected, units lost,
double releases, budget gaps; crash runs per crash point. Exit status 1 if any figure is not 0.

    .venv/bin/python scripts/reliability.py [--schedules 3000] [--crashes 300] [--jobs 4]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from faultkit import run_crash, run_lost_responses  # noqa: E402

from pf_metered.sandbox import Sandbox  # noqa: E402


def lost_responses(n: int, honour: bool) -> dict[str, int]:
    totals: collections.Counter[str] = collections.Counter()
    bad: list[tuple[int, dict[str, int]]] = []
    with Sandbox(honour_idempotency=honour) as sb:
        for seed in range(n):
            f = run_lost_responses(seed, sb)
            totals["schedules"] += 1
            totals["units"] += f["units"]
            totals["faults injected"] += f["injected"]
            totals["units lost (micro-USDC off)"] += f["lost"]
            totals["double releases"] += f["doubled"]
            totals["budget gap"] += abs(f["budget_gap"])
            totals["receipt gap"] += f["receipt_gap"]
            if f["lost"] or f["doubled"] or f["budget_gap"] or f["receipt_gap"]:
                bad.append((seed, f))
        sb.audit()
    for seed, f in bad[:10]:
        print(f"  FAILED seed {seed}: {f}")
    return dict(totals)


def crashes(n: int, jobs: int, durability: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as d, Sandbox(str(Path(d) / "ledger.db")) as sb:
        server = sb.serve()
        with ThreadPoolExecutor(jobs) as pool:
            results = list(
                pool.map(
                    lambda s: run_crash(s, sb, server.base_url, d, durability=durability), range(n)
                )
            )
        sb.audit()
    points = collections.Counter(str(r["point"]) for r in results)
    killed = sum(1 for r in results if r["code"] != 0)
    return {
        "runs": n,
        "killed": killed,
        "by point": dict(sorted(points.items())),
        "units lost": sum(int(r["lost"]) for r in results),  # type: ignore[call-overload]
        "pay gaps (micro-USDC)": sum(int(r["pay_gap"]) for r in results),  # type: ignore[call-overload]
        "budget gaps": sum(abs(int(r["budget_gap"])) for r in results),  # type: ignore[call-overload]
        "double releases": sum(int(r["doubled"]) for r in results),  # type: ignore[call-overload]
        "extra escrows": sum(int(r.get("escrows", 1)) - 1 for r in results),  # type: ignore[call-overload]
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schedules", type=int, default=3000)
    ap.add_argument("--crashes", type=int, default=300)
    ap.add_argument("--jobs", type=int, default=4)
    args = ap.parse_args()
    failed = False
    for honour in (True, False):
        t = time.perf_counter()
        figures = lost_responses(args.schedules, honour)
        label = "honours Idempotency-Key" if honour else "ignores Idempotency-Key"
        print(f"lost responses, server {label} ({time.perf_counter() - t:.0f} s): {figures}")
        failed |= any(
            figures[k]
            for k in ("units lost (micro-USDC off)", "double releases", "budget gap", "receipt gap")
        )
    for durability, n in (("per_record", args.crashes), ("group", max(1, args.crashes // 3))):
        t = time.perf_counter()
        figures = crashes(n, args.jobs, durability)
        print(f"crash recovery, {durability} journal ({time.perf_counter() - t:.0f} s): {figures}")
        failed |= any(
            figures[k]
            for k in (
                "units lost",
                "pay gaps (micro-USDC)",
                "budget gaps",
                "double releases",
                "extra escrows",
            )
        )
    print("RESULT:", "FAILED" if failed else "all figures 0")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
