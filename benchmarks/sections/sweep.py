"""Sections 1–2: a sweep's throughput against the plain diffusers loop, and where stagediff's time goes."""

from __future__ import annotations

from common import Case, side_by_side


def sweep(family: str, case: Case, prompts: int, seeds: int) -> dict:
    plain, staged, max_diff = side_by_side(family, case, prompts, seeds)
    images = prompts * seeds
    stage_seconds = {name: round(s["seconds"], 2) for name, s in staged["stages"].items()}
    compute = sum(s["compute_seconds"] for s in staged["stages"].values())
    loads = sum(s["load_seconds"] for s in staged["stages"].values())
    encode_per_prompt = staged["stages"]["encode"]["compute_seconds"] / prompts
    return {
        "family": family, "model": case.label(), "images": images, "steps": case.steps,
        "size": case.size, "plain_images_per_s": images / plain["seconds"],
        "stagediff_images_per_s": images / staged["seconds"], "ratio": plain["seconds"] / staged["seconds"],
        # The ratio if the encode calls it skips were stagediff's only saving: the loop's time over the
        # loop's time less those calls (timed by stagediff's encode, the same encoder and prompts).
        "reuse_ceiling": plain["seconds"] / (plain["seconds"] - (images - prompts) * encode_per_prompt),
        "max_pixel_diff": max_diff, "stage_seconds": stage_seconds, "model_load_seconds": round(loads, 2),
        "compute_seconds": round(compute, 2), "store_and_other_seconds": round(staged["seconds"] - compute - loads, 2),
        "encode_calls": {"stagediff": staged["stages"]["encode"]["computed"], "plain_loop": plain["encode_calls"]},
    }


def markdown(rows: list[dict]) -> list[str]:
    lines = ["## 1–2. Sweep throughput and where the time goes", "",
             "Reuse ceiling: the ratio if the encode calls stagediff skips were its only saving.", "",
             "| family | model | images | steps | size | plain loop img/s | stagediff img/s | ratio | reuse ceiling "
             "| max pixel diff | encode calls (stagediff / loop) | stage seconds (encode / denoise / decode) "
             "| model load s | store+other s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        stages = row["stage_seconds"]
        lines.append(
            f"| {row['family']} | {row['model']} | {row['images']} | {row['steps']} | {row['size']} | "
            f"{row['plain_images_per_s']:.3f} | {row['stagediff_images_per_s']:.3f} | {row['ratio']:.2f}× | "
            f"{row['reuse_ceiling']:.2f}× | {row['max_pixel_diff']} | {row['encode_calls']['stagediff']} / {row['encode_calls']['plain_loop']} | "
            f"{stages['encode']} / {stages['denoise']} / {stages['decode']} | {row['model_load_seconds']} | "
            f"{row['store_and_other_seconds']} |")
    return lines
