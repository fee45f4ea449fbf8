"""Section 11 (`--cli`): `stagediff generate` end to end against the plain diffusers loop, and a no-op rerun."""

from __future__ import annotations

import json
import shutil
import time

from common import PROMPTS, Case, cli_generate, measure_table, model_folder, pixel_diff, run_workload, work_path

CLI_CASE = Case("sdxl", "small", 10, 256, 256)


def cli_end_to_end(prompts: int = 3, seeds: int = 4, case: Case = CLI_CASE) -> dict:
    """`stagediff generate` as a user runs it (a new process: imports, model loads, the three stages)
    against the plain diffusers loop on the same items, and a no-op rerun of a finished batch of 24 items
    (tiny SDXL, 6 prompts × 4 seeds). The first run is one item per call (`--batch-size 1`), the second
    the default `--batch-size auto`."""
    batch = {"model": model_folder(case.model, case.scale), "prompts": PROMPTS[:prompts],
             "seeds": list(range(seeds)), **case.arguments()}
    plain_out = work_path("plain", "cli")
    shutil.rmtree(plain_out, ignore_errors=True)
    # Both timed as whole processes, imports included.
    start = time.perf_counter()
    run_workload("plain_loop", {**batch, "dtype": "float32", "out": str(plain_out)})
    plain_seconds = time.perf_counter() - start
    store = work_path("stores", "cli")
    generate_seconds, _ = cli_generate(batch, store)
    from stagediff.manifest import artifact_path

    (manifest,) = store.glob("runs/*/manifest.json")
    ours = [store / artifact_path(item["media"]) for item in json.loads(manifest.read_text())["items"]]
    theirs = [plain_out / f"{p}-{seed}.png" for p in range(prompts) for seed in range(seeds)]
    auto_seconds, _ = cli_generate({**batch, "batch_size": "auto"}, work_path("stores", "cli-auto"))

    small = {"model": model_folder("sdxl", "tiny"), "prompts": [f"{PROMPTS[i % 4]}, study {i}" for i in range(6)],
             "seeds": list(range(4)), "steps": 2, "height": 64, "width": 64}
    cli_generate(small, work_path("stores", "cli-noop"))
    noop_seconds, _ = cli_generate(small, work_path("stores", "cli-noop"), fresh=False)
    return {"model": case.label(), "items": prompts * seeds, "steps": case.steps, "size": case.size,
            "plain_loop_s": plain_seconds, "stagediff_generate_s": generate_seconds,
            "ratio": plain_seconds / generate_seconds,
            "stagediff_generate_auto_s": auto_seconds, "auto_ratio": plain_seconds / auto_seconds,
            "max_pixel_diff": max(pixel_diff(str(a), str(b)) for a, b in zip(ours, theirs)),
            "noop_items": len(small["prompts"]) * len(small["seeds"]), "noop_generate_s": noop_seconds}


def markdown(measures: dict) -> list[str]:
    return measure_table("11. `stagediff generate` end to end against the plain diffusers loop", measures)
