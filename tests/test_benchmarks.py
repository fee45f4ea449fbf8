"""Smoke test of the benchmark machinery: one tiny sweep, stagediff against the plain diffusers loop."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import common  # noqa: E402
import run  # noqa: E402
from common import QUICK, Case  # noqa: E402
from sections import cli_end_to_end, cpu_scaling, decode, gpu, memory, step_cache, sweep  # noqa: E402


def test_quick_sweep_matches_the_plain_loop_and_renders(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "WORK", tmp_path)
    row = sweep.sweep("sdxl", QUICK["sdxl"], prompts=1, seeds=2)

    assert row["images"] == 2 and row["max_pixel_diff"] == 0
    # Counted as they happen: the pipeline encodes its prompt on every call, stagediff once per prompt.
    assert row["encode_calls"] == {"stagediff": 1, "plain_loop": 2}
    assert row["plain_images_per_s"] > 0 and row["stagediff_images_per_s"] > 0
    assert set(row["stage_seconds"]) == {"encode", "denoise", "decode"}
    assert all(seconds > 0 for seconds in row["stage_seconds"].values())

    report = {"date": "d", "machine": "m", "sweep": [row], "memory": [], "compile": {}, "orchestration": {}, "gpu": {}}
    table = run.markdown(report)
    assert "| sdxl | sdxl (tiny) | 2 |" in table


def test_gpu_section_code_path_runs_on_this_device_at_tiny_scale(tmp_path, monkeypatch):
    """Section 6 (real sizes, bf16, on a GPU) run here with the tiny model: both paths in bf16, the same
    pixels, per-step and per-item seconds for each, and its table."""
    monkeypatch.setattr(common, "WORK", tmp_path)
    case = Case("sdxl", "tiny", 3, 64, 64, anchor="an anchor")
    row = gpu.gpu_row("sdxl", case, seeds=2, dtype="bfloat16")

    assert row["model"] == "sdxl (tiny, bfloat16)" and row["size"] == "64×64"
    assert row["max_pixel_diff"] == 0
    assert 0 < row["diffusers_s_per_step"] < row["diffusers_s_per_item"]
    assert 0 < row["stagediff_s_per_step"] < row["stagediff_s_per_item"]
    assert row["stagediff_cpu_encode_s_per_prompt"] > 0
    table = "\n".join(gpu.markdown({"device": "this machine", "rows": [row]}))
    assert "| sdxl | sdxl (tiny, bfloat16) | 3 | 64×64 |" in table and "an anchor" in table


def test_memory_section_measures_each_stage_process_and_the_full_pipeline(tmp_path, monkeypatch):
    """Sections 3 and 3b (`--real-memory` runs it on the `full` models in bf16) here with the tiny model:
    each stage and the full pipeline in a process of its own, then its table."""
    monkeypatch.setattr(common, "WORK", tmp_path)
    row = memory.memory("sdxl", QUICK["sdxl"], "bfloat16")

    assert row["model"] == "sdxl (tiny, bfloat16)"
    # Every process imports torch and diffusers (hundreds of MB) before it loads anything.
    assert all(row[name] > 100 for name in ("encode", "denoise", "decode", "full_pipeline")), row
    table = run.markdown({"date": "d", "machine": "m", "real_memory": [row]})
    assert "## 3b." in table and "| sdxl | sdxl (tiny, bfloat16) | 64×64 |" in table and "## 6." not in table


def test_cpu_scaling_section_splits_the_items_over_one_process_per_core(tmp_path, monkeypatch):
    """Section 7 (`--cpu-scaling`) here with the tiny model: every item denoised both ways, its images
    compared, and its table."""
    monkeypatch.setattr(common, "WORK", tmp_path)
    row = cpu_scaling.cpu_scaling("sdxl", QUICK["sdxl"], items=3)

    assert row["items"] == 3 and row["max_pixel_diff"] <= 1
    assert row["one_process_s_per_item"] > 0 and row["per_core_processes_s_per_item"] > 0 and row["fan_out_ratio"] > 0
    assert len(list((tmp_path / "stores" / "scaling-sdxl").glob("share-*"))) == min(os.cpu_count(), 3)
    table = run.markdown({"date": "d", "machine": "m", "cpu_scaling": [row]})
    assert "## 7." in table and "| sdxl | sdxl (tiny) | 3 | 64×64 |" in table


def test_decode_section_compares_torchax_with_torch_and_reuses_the_compile_cache(tmp_path, monkeypatch):
    """Section 9 (`--decode`) backends row here with the tiny model: the same latents decoded by both
    backends, torchax compiled in a first process and loaded from its cache in a second, and its table."""
    monkeypatch.setattr(common, "WORK", tmp_path)
    row = decode.decode_backends("sdxl", QUICK["sdxl"], items=2)

    assert row["max_pixel_diff"] <= 2 and row["programs"] == 1
    assert row["torch_s_per_item"] > 0 and row["torchax_s_per_item"] > 0 and row["cold_compile_s"] > 0
    assert row["cache_hits"] > 0
    table = run.markdown({"date": "d", "machine": "m",
                            "decode": {"backends": [row], "wan_programs": [], "tiled_memory": []}})
    assert "## 9." in table and "| sdxl | sdxl (tiny) | 64×64 |" in table


def test_step_cache_section_compares_each_setting_with_the_exact_run(tmp_path, monkeypatch):
    """Section 10 (`--step-cache`) here with tiny Wan: MagCache calibrated first (diffusers ships no Wan
    ratios), each setting's denoise time and its frames against the exact run's, and its table."""
    monkeypatch.setattr(common, "WORK", tmp_path)
    rows = step_cache.step_cache("wan", Case("wan", "tiny", 4, 32, 32, 5), ("fbcache:100", "magcache:0"))

    by_setting = {row["cache"]: row for row in rows}
    assert set(by_setting) == {"fbcache:100", "magcache:0"}
    assert all(row["speedup"] > 0 and row["wall_speedup"] > 0 and row["exact_cpu_s"] > 0 for row in rows)
    # A threshold of 100 skips every block but the first after the first step (Wan's 2 tiny blocks: 5 of 8
    # block runs per pass); 0 skips none (calibrated ratios are not 1).
    assert by_setting["magcache:0"]["block_work"] == 1 and by_setting["magcache:0"]["psnr_db"] == float("inf")
    assert by_setting["magcache:0"]["mean_abs_error"] == 0
    assert by_setting["fbcache:100"]["block_work"] == 5 / 8 and by_setting["fbcache:100"]["mean_abs_error"] > 0
    table = run.markdown({"date": "d", "machine": "m", "step_cache": rows})
    assert "## 10." in table and "| wan | wan (tiny) | 4 | 32×32×5f | `fbcache:100` |" in table


def test_cli_section_runs_the_command_against_the_plain_loop(tmp_path, monkeypatch):
    """Section 11 (`--cli`) here with the tiny model: `stagediff generate` in a new process renders the
    plain loop's images, and its no-op rerun of 24 items, and its table."""
    monkeypatch.setattr(common, "WORK", tmp_path)
    row = cli_end_to_end.cli_end_to_end(prompts=1, seeds=2, case=QUICK["sdxl"])

    assert row["items"] == 2 and row["max_pixel_diff"] <= 2
    assert row["plain_loop_s"] > 0 and row["stagediff_generate_s"] > 0 and row["ratio"] > 0
    assert row["noop_items"] == 24 and row["noop_generate_s"] > 0
    table = run.markdown({"date": "d", "machine": "m", "cli": row})
    assert "## 11." in table and "| noop_items | 24 |" in table
