"""Section 5: orchestration overhead, the same 8 items through the library, the generate flow in-process,
and as a deployment run on `make serve`'s setup (ephemeral and warm)."""

from __future__ import annotations

import shutil

from common import PROMPTS, QUICK, Stack, measure_table, model_folder, run_workload, work_path


def orchestration(pooled: bool) -> dict:
    # One item per call everywhere (stagediff's own default is auto), as the library workload runs.
    base = {"model": model_folder("sdxl", "tiny"), "prompts": PROMPTS[:2], "seeds": [0, 1, 2, 3],
            **QUICK["sdxl"].arguments(), "batch_size": 1}
    items = 8
    results = {}
    for name, workload in (("library", "staged"), ("in_process_flow", "flow_in_process")):
        store = work_path("stores", f"orchestration-{name}")
        shutil.rmtree(store, ignore_errors=True)
        measured = run_workload(workload, {**base, "store": str(store)})
        results[f"{name}_s_per_item"] = measured["seconds"] / items
        if "server_start_seconds" in measured:
            results["ephemeral_api_start_s"] = measured["server_start_seconds"]
    if pooled:
        results.update(pooled_paths(base, items))
    return results


def pooled_paths(base: dict, items: int) -> dict:
    """The batch as a `generate` deployment run on `make serve`'s setup, ephemeral (a flow run per stage
    and unit) and warm (stage workers, models loaded by an earlier batch)."""
    with Stack("orchestration") as stack:
        ephemeral = stack.run_batch({**base, "dispatch": "deployments"}, "pooled")
        stack.run_batch({**base, "seeds": [9], "dispatch": "warm"}, "warm-up")
        warm = stack.run_batch({**base, "dispatch": "warm"}, "warm")
    return {"pooled_setup_s": stack.setup_seconds, "pooled_s_per_item": ephemeral["wall_s"] / items,
            "pooled_first_item_s": ephemeral["first_item_s"], "warm_s_per_item": warm["wall_s"] / items,
            "warm_first_item_s": warm["first_item_s"], "pooled_runs_ok": ephemeral["ok"] and warm["ok"]}


def markdown(measures: dict) -> list[str]:
    return measure_table("5. Orchestration overhead (tiny SDXL, 8 items)", measures, unit="seconds")
