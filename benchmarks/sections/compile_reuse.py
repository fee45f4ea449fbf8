"""Section 4: torchax compilation, cold, warm in the process and in a new process with the persistent cache."""

from __future__ import annotations

import shutil

from common import PROMPTS, QUICK, measure_table, model_folder, run_workload, work_path


def compile_reuse() -> dict:
    base = {"model": model_folder("sdxl", "tiny"), "prompts": PROMPTS[:1], "seeds": [0],
            "store": str(work_path("stores", "compile")), **QUICK["sdxl"].arguments()}
    cache = work_path("compile-cache")
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(base["store"], ignore_errors=True)
    env = {"STAGEDIFF_COMPILE_CACHE": str(cache)}
    cold = run_workload("compile_times", base, env)
    shutil.rmtree(base["store"], ignore_errors=True)
    cached = run_workload("compile_times", base, env)
    return {"cold_compile_s": cold["first_compile_seconds"], "warm_in_process_item_s": cold["warm_item_seconds"],
            "warm_in_process_new_compiles": cold["warm_compiles"], "new_process_with_cache_compile_s":
            cached["first_compile_seconds"], "cache_hits_new_process": cached["cache_hits"]}


def markdown(measures: dict) -> list[str]:
    return measure_table("4. Compile (torchax, tiny SDXL)", measures)
