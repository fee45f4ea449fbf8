"""Section 7 (`--cpu-scaling`): one process on all cores against one single-thread process per core."""

from __future__ import annotations

import os
import shutil

from common import FULL, PROMPTS, Case, model_folder, pixel_diff, run_workload, run_workloads_at_once, work_path


def cpu_scaling(family: str, case: Case, items: int = 4) -> dict:
    """One process on all cores against one single-thread process per core, each denoising its share of
    the same items at the same time. The second is what fanning a sweep out over the cores would give a
    CPU pool; the pixel difference says whether it keeps the images."""
    cores = os.cpu_count() or 1
    base = {"model": model_folder(case.model, case.scale), "prompts": PROMPTS[:1], **case.arguments()}
    stores = work_path("stores", f"scaling-{family}")
    shutil.rmtree(stores, ignore_errors=True)
    together = run_workload("staged", {**base, "seeds": list(range(items)), "threads": cores,
                                       "store": str(stores / "together")})
    processes = min(cores, items)
    shares = [list(range(first, items, processes)) for first in range(processes)]
    apart = run_workloads_at_once("staged", [{**base, "seeds": seeds, "threads": 1, "store": str(stores / f"share-{i}")}
                                             for i, seeds in enumerate(shares)])
    together_seconds = together["stages"]["denoise"]["compute_seconds"]
    apart_seconds = max(result["stages"]["denoise"]["compute_seconds"] for result in apart)
    media_apart = {seed: uri for seeds, result in zip(shares, apart) for seed, uri in zip(seeds, result["media"])}
    diffs = [pixel_diff(uri, media_apart[seed]) for seed, uri in enumerate(together["media"])]
    return {"family": family, "model": case.label(), "items": items, "size": case.size,
            "one_process_s_per_item": together_seconds / items, "per_core_processes_s_per_item": apart_seconds / items,
            "fan_out_ratio": together_seconds / apart_seconds, "max_pixel_diff": max(diffs)}


def cpu_scaling_section() -> list[dict]:
    """Every family's small model."""
    return [cpu_scaling(family, case) for family, case in FULL.items()]


def markdown(rows: list[dict]) -> list[str]:
    lines = ["## 7. CPU fan-out: one process on all cores vs one single-thread process per core", "",
             "Denoise compute of the same items at the same time, model loads left out.", "",
             "| family | model | items | size | one process s/item | process per core s/item | fan-out ratio "
             "| max pixel diff |", "|---|---|---|---|---|---|---|---|"]
    return lines + [f"| {row['family']} | {row['model']} | {row['items']} | {row['size']} | "
                    f"{row['one_process_s_per_item']:.2f} | {row['per_core_processes_s_per_item']:.2f} | "
                    f"{row['fan_out_ratio']:.2f}× | {row['max_pixel_diff']} |" for row in rows]
