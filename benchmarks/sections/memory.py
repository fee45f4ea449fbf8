"""Sections 3 and 3b: peak memory of each stage's process against the full diffusers pipeline's, on the
benchmark's models (3) and on the real-size architectures in bf16 (3b, `--real-memory`)."""

from __future__ import annotations

import shutil

from common import PROMPTS, Case, model_folder, run_workload, work_path

# Real-size architectures (random weights, bf16) for peak memory on this machine: one step at a small
# size, so that the weights dominate, as they do at real sizes. FLUX.1 (34 GB in bf16) needs more RAM.
REAL_MEMORY = {"sdxl": Case("sdxl", "full", 1, 256, 256), "wan": Case("wan", "full", 1, 96, 96, 5)}
TITLE = "3. Peak memory (RSS, MB) per stage process vs the full pipeline"
REAL_SIZE_TITLE = ("3b. Peak memory (RSS, MB) at real size: the published architectures, random weights in bf16, "
                   "one step")


def memory(family: str, case: Case, dtype: str = "float32") -> dict:
    base = {"model": model_folder(case.model, case.scale), "prompts": PROMPTS[:1], "seeds": [0], "dtype": dtype,
            "store": str(work_path("stores", f"memory-{family}-{case.scale}")), **case.arguments()}
    shutil.rmtree(base["store"], ignore_errors=True)
    peaks = {name: run_workload("stage", {**base, "stage": name})["max_rss_mb"]
             for name in ("encode", "denoise", "decode")}
    full = run_workload("full_pipeline", {**base, "out": str(work_path("plain", f"memory-{family}-{case.scale}"))})
    return {"family": family, "model": case.label(dtype), "size": case.size,
            **{k: round(v) for k, v in peaks.items()}, "full_pipeline": round(full["max_rss_mb"])}


def real_memory_section() -> list[dict]:
    """Section 3b: the real-size architectures in bf16, one step."""
    return [memory(family, case, "bfloat16") for family, case in REAL_MEMORY.items()]


def markdown(rows: list[dict], title: str = TITLE) -> list[str]:
    lines = [f"## {title}", "", "| family | model | size | encode | denoise | decode | full pipeline |",
             "|---|---|---|---|---|---|---|"]
    return lines + [f"| {row['family']} | {row['model']} | {row['size']} | {row['encode']} | {row['denoise']} | "
                    f"{row['decode']} | {row['full_pipeline']} |" for row in rows]


def real_memory_markdown(rows: list[dict]) -> list[str]:
    return markdown(rows, REAL_SIZE_TITLE)
