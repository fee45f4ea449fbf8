"""Section 10 (`--step-cache`): each step-cache method's denoise speed-up and pixels against the exact run."""

from __future__ import annotations

import shutil

import numpy as np

from common import PROMPTS, Case, model_folder, read_frames, run_workload, work_path

# One item per setting (each setting reruns the whole denoise loop) with enough steps for the caches to
# act. These random-weight models change far more per step than trained ones (the first block's residual
# by 40-50% for flux1, ~20% for wan, against a few % for trained models), so fbcache's thresholds are set
# for them: each family's first skips some steps, its second most.
STEP_CACHE = {
    "flux1": Case("flux1", "small", 12, 128, 128),
    "flux2-klein": Case("flux2-klein", "small", 12, 128, 128),
    "wan": Case("wan", "small", 12, 64, 64, 9),
}
STEP_CACHE_SETTINGS = {
    "flux1": ("fbcache:0.45", "fbcache:0.6", "magcache", "magcache:0.25", "taylorseer:3", "taylorseer",
              "taylorseer-attention"),
    # FLUX.2's First Block Cache fails inside diffusers 0.42 (stagediff refuses it).
    "flux2-klein": ("magcache", "magcache:0.25", "taylorseer:3", "taylorseer", "taylorseer-attention"),
    # TaylorSeer's attention caching finds no attention modules in Wan (stagediff refuses it).
    "wan": ("fbcache:0.2", "fbcache:0.3", "magcache", "magcache:0.25", "taylorseer:3", "taylorseer"),
}


def step_cache(family: str, case: Case, settings: tuple[str, ...]) -> list[dict]:
    """The denoise time and the pixels of each cache setting against the exact run (`none`) of the same
    item, in one process."""
    store = work_path("stores", f"step-cache-{family}")
    shutil.rmtree(store, ignore_errors=True)
    # One thread, timed by the process's CPU time: on a shared machine, wall-clock time (and the CPU time of
    # several threads, which spin while they wait for each other) depends on what else runs.
    measured = run_workload("cached_denoise", {
        "model": model_folder(case.model, case.scale), "prompts": PROMPTS[:1], "seeds": [0], "other_seed": 1000,
        "threads": 1, "store": str(store), "caches": ["none", *settings], **case.arguments()})
    exact = measured["none"]
    rows = []
    for setting in settings:
        cached = measured[setting]
        ours = np.concatenate([read_frames(uri) for uri in cached["media"]]).astype(float)
        theirs = np.concatenate([read_frames(uri) for uri in exact["media"]]).astype(float)
        mse = float(np.mean((ours - theirs) ** 2))
        rows.append({"family": family, "model": case.label(), "steps": case.steps, "size": case.size,
                     "cache": setting, "exact_cpu_s": exact["denoise_cpu_seconds"], "cpu_s": cached["denoise_cpu_seconds"],
                     "speedup": exact["denoise_cpu_seconds"] / cached["denoise_cpu_seconds"],
                     "wall_speedup": exact["denoise_seconds"] / cached["denoise_seconds"],
                     "block_work": cached["block_work"] / exact["block_work"],
                     "psnr_db": float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse),
                     "mean_abs_error": float(np.mean(np.abs(ours - theirs)))})
    return rows


def step_cache_section() -> list[dict]:
    """Every family of STEP_CACHE at each of its settings."""
    return [row for family, case in STEP_CACHE.items() for row in step_cache(family, case, STEP_CACHE_SETTINGS[family])]


def markdown(rows: list[dict]) -> list[str]:
    lines = ["## 10. Step caching (`--cache`): denoise speed-up and pixels against the exact run", "",
             "Torch backend, float32, one thread, one item per setting, in one process after a warm-up. Speed-up: "
             "the exact denoise's CPU time over the cached one's (on one thread, CPU time is the work done, whatever "
             "else shares the machine). Block work: the multiply-accumulates of the Linear layers inside the "
             "transformer blocks that ran, as a share of the exact run's. PSNR and mean absolute error in 8-bit "
             "levels against the exact image (Wan: every frame of the MP4).", "",
             "| family | model | steps | size | --cache | exact denoise CPU s | cached denoise CPU s | speed-up "
             "| block work | PSNR dB | mean abs error |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    return lines + [f"| {row['family']} | {row['model']} | {row['steps']} | {row['size']} | `{row['cache']}` | "
                    f"{row['exact_cpu_s']:.1f} | {row['cpu_s']:.1f} | {row['speedup']:.2f}× | "
                    f"{row['block_work']:.0%} | {row['psnr_db']:.1f} | {row['mean_abs_error']:.2f} |" for row in rows]
