"""The chaos benchmark (`benchmarks/chaos.py`) at tiny size: one fault, on the shared real server."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import chaos  # noqa: E402


def test_one_fault_at_tiny_size_completes_with_nothing_lost(prefect_stack, prefect_client, tiny_sdxl, tmp_path):
    bench = chaos.Chaos(prefect_stack, tiny_sdxl, tmp_path, items=3, steps=4, outage=1,
                        accelerators=("stage-accelerator-0",))
    outcome = bench.run("worker_killed_and_replaced")

    assert outcome.completed and outcome.lost == 0 and outcome.items == 3
    assert "| worker_killed_and_replaced | yes | 0 of 3 |" in chaos.table([outcome])
