"""Smoke test of the benchmark machinery: one tiny sweep, stagediff against the plain diffusers loop."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import run as bench  # noqa: E402


def test_quick_sweep_matches_the_plain_loop_and_renders(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "WORK", tmp_path)
    row = bench.sweep("sdxl", bench.QUICK["sdxl"], prompts=1, seeds=2)

    assert row["images"] == 2 and row["max_pixel_diff"] == 0
    assert row["encode_calls"] == {"stagediff": 1, "plain_loop": 2}
    assert row["plain_images_per_s"] > 0 and row["stagediff_images_per_s"] > 0
    assert set(row["stage_seconds"]) == {"encode", "denoise", "decode"}

    report = {"date": "d", "machine": "m", "sweep": [row], "memory": [], "compile": {}, "orchestration": {}, "gpu": {}}
    table = bench.markdown(report)
    assert "| sdxl | sdxl (tiny) | 2 |" in table
