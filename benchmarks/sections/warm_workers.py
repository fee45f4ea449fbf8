"""Section 8 (`--warm`): a batch on the warm stage workers against the in-process CLI, the first dispatch
and the flows' import time, one vs two accelerator workers, a worker's memory with alternating models."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import PROMPTS, ROOT, Case, Stack, cli_generate, measure_table, model_folder, work_path

WARM_CASE = Case("sdxl", "tiny", 8, 128, 128)
TITLE = "8. Warm stage workers (tiny SDXL, 12 prompts × 2 seeds, 8 steps, 128²)"


def warm_workers(prompts: int = 12, seeds: int = 2) -> dict:
    """One batch (tiny SDXL, 12 prompts × 2 seeds, 8 steps, 128²) on the warm stage workers against the
    in-process CLI; first item after the workers start; one vs two accelerator workers; a worker's
    memory when batches alternate between two models."""
    model = model_folder("sdxl", "tiny")
    # One item per call on both sides (stagediff's own default is auto).
    batch = {"model": model, "prompts": [f"{PROMPTS[i % len(PROMPTS)]}, study {i}" for i in range(prompts)],
             "seeds": list(range(seeds)), **{k: v for k, v in WARM_CASE.arguments().items() if v is not None},
             "batch_size": 1, "dispatch": "warm"}
    items = prompts * seeds
    with Stack("warm", accelerator_workers=0) as stack:
        local = stack.local
        local.kill("stage-encode")
        started = time.perf_counter()
        workers = [local.start_stage_worker("stage-encode", "encode"),
                   local.start_stage_worker("stage-accelerator-0", "denoise,decode")]
        cold = stack.run_batch(batch, "cold", since=started)
        local.wait_until_connected(*workers)
        # Back to back (the idle workers use no CPU), so both see the same machine.
        cli, cli_cpu = cli_generate(batch, work_path("stores", "warm-cli"))
        one = stack.run_batch(batch, "one-worker")
        flow_import = flow_import_seconds(local.env)
        local.wait_until_connected(local.start_stage_worker("stage-accelerator-1", "denoise,decode"))
        stack.run_batch({**batch, "prompts": batch["prompts"][:2], "seeds": [99]}, "warm-up-second")
        two = stack.run_batch(batch, "two-workers")
        local.kill("stage-accelerator-1")
        memory = alternating_models(stack)
    return {
        "items": items, "cli_in_process_s": cli, "cli_in_process_cpu_s": cli_cpu,
        "workers_start_to_first_item_s": cold["first_item_s"], "workers_start_to_batch_done_s": cold["wall_s"],
        "warm_pooled_s": one["wall_s"], "warm_pooled_first_item_s": one["first_item_s"],
        "warm_pooled_vs_cli": one["wall_s"] / cli, "warm_pooled_watch_exit_s": one["watch_exit_s"],
        "first_dispatch_s": one["first_dispatch_s"], "flow_import_s": flow_import,
        # CPU seconds (every process of the stack) do not swell with other work on the machine.
        "warm_pooled_cpu_s": one["cpu_s"], "warm_pooled_vs_cli_cpu": one["cpu_s"] / cli_cpu,
        "orchestration_overhead_s_per_item": (one["wall_s"] - cli) / items,
        "orchestration_overhead_cpu_s_per_item": (one["cpu_s"] - cli_cpu) / items,
        "one_worker_items_per_s": items / one["wall_s"], "two_workers_items_per_s": items / two["wall_s"],
        "runs_ok": cold["ok"] and one["ok"] and two["ok"] and memory.pop("ok"),
        **memory,
    }


def flow_import_seconds(env: dict, tries: int = 3) -> float:
    """A fresh interpreter's wall time for `import flows.generate, flows.sweep` (interpreter start
    included), best of `tries`: what a flow run's process pays before the flow starts."""
    seconds = []
    for _ in range(tries):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import flows.generate, flows.sweep"], cwd=ROOT, env=env, check=True,
                       capture_output=True)
        seconds.append(time.perf_counter() - start)
    return min(seconds)


def alternating_models(stack: Stack) -> dict:
    """Batches on model A, B (another copy of A's files), A again on the one accelerator worker:
    its resident memory after each, against the size of the model's UNet."""
    import psutil

    model_a = Path(model_folder("sdxl", "small"))
    model_b = work_path("models", "sdxl-small-copy")
    if not model_b.exists():
        shutil.copytree(model_a, model_b, copy_function=os.link)
    worker = psutil.Process(stack.local.processes["stage-accelerator-0"].pid)
    before = worker.memory_info().rss
    batch = {"prompts": PROMPTS[:1], "seeds": [0], "steps": 1, "height": 64, "width": 64, "dispatch": "warm"}
    resident, ok = [], True
    for index, model in enumerate((model_a, model_b, model_a)):
        ok &= stack.run_batch({**batch, "model": str(model)}, f"memory-{index}")["ok"]
        resident.append(worker.memory_info().rss)
    megabytes = 2**20
    return {"unet_mb": sum(f.stat().st_size for f in model_a.glob("unet/*.safetensors")) / megabytes,
            "worker_rss_before_mb": before / megabytes, "worker_rss_after_a_mb": resident[0] / megabytes,
            "worker_rss_after_b_mb": resident[1] / megabytes, "worker_rss_after_a_again_mb": resident[2] / megabytes,
            "ok": ok}


def markdown(measures: dict) -> list[str]:
    lines = measure_table(TITLE, measures)
    return lines + ["", "first_dispatch_s: from the start of `prefect deployment run` (the warm pooled batch) to "
                    "the creation of the generate run's first stage task run on the server. flow_import_s: a fresh "
                    "interpreter running `import flows.generate, flows.sweep`, interpreter start included, best of 3."]
