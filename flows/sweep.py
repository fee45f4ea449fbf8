"""The `sweep` flow, meant to run on a schedule: prompts (a list, or a file with one prompt per line,
local or in a bucket) × a range of seeds, generating only what the store does not hold yet."""

from __future__ import annotations

from typing import Literal

import fsspec
from prefect import flow

from flows.generate import generate
from stagediff.errors import StagediffError
from stagediff.request import DEFAULT_STORE


def read_prompt_file(uri: str) -> list[str]:
    """Non-empty lines of a local or fsspec (gs://) text file."""
    try:
        with fsspec.open(uri, "r") as file:
            return [line.strip() for line in file if line.strip()]
    except FileNotFoundError:
        raise StagediffError(f"prompt file not found: {uri}") from None


@flow(name="sweep", description="Scheduled sweep over prompts × a seed range; generates what is missing.")
def sweep(
    model: str,
    prompts: list[str] | None = None,
    prompt_file: str | None = None,
    seed_start: int = 0,
    seed_count: int = 8,
    negative_prompt: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    fps: int | None = None,
    flow_shift: float | None = None,
    true_cfg: float | None = None,
    dtype: Literal["float32", "bfloat16"] = "float32",
    store: str = DEFAULT_STORE,
    backend: Literal["auto", "torch", "torchax"] = "auto",
    batch_size: int = 1,
    mesh: str | None = None,
    run_name: str | None = None,
) -> str:
    """Generate `prompts` (plus the lines of `prompt_file`) with seeds seed_start .. seed_start+seed_count-1."""
    all_prompts = list(prompts or []) + (read_prompt_file(prompt_file) if prompt_file else [])
    if seed_count < 1 or seed_start < 0:
        raise StagediffError(f"seed range start {seed_start} count {seed_count}: start must be >= 0 and count >= 1")
    options = {name: value for name, value in locals().items() if name not in ("prompts", "prompt_file", "seed_start", "seed_count", "all_prompts")}
    return generate(prompts=all_prompts, seeds=list(range(seed_start, seed_start + seed_count)), **options)
