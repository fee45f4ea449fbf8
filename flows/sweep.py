"""The `sweep` flow, meant to run on a schedule: prompts (a list, or a file with one prompt per line,
local or in a bucket) × a range of seeds, generating only what the store does not hold yet."""

from __future__ import annotations

import fsspec

from flows.generate import generate
from flows.parameters import GENERATE_OPTIONS, generation_flow
from stagediff.confinement import check_location
from stagediff.errors import StagediffError
from stagediff.options import Option, option_named

SWEEP_OPTIONS: tuple[Option, ...] = (
    option_named(GENERATE_OPTIONS, "model"),
    Option("prompts", str, "prompts to generate (with those of prompt_file)", repeated=True, default=()),
    Option("prompt_file", str, "a local or gs:// text file, one prompt per line"),
    Option("seed_start", int, "the first seed", default=0),
    Option("seed_count", int, "how many seeds, from seed_start", default=8),
    *(o for o in GENERATE_OPTIONS if o.name not in ("model", "prompts", "seeds")),
)


def read_prompt_file(uri: str) -> list[str]:
    """Non-empty lines of a local or fsspec (gs://) text file."""
    check_location("prompt_file", uri)
    try:
        with fsspec.open(uri, "r") as file:
            return [line.strip() for line in file if line.strip()]
    except FileNotFoundError:
        raise StagediffError(f"prompt file not found: {uri}") from None


def run_sweep(parameters: dict) -> str:
    """Generate `prompts` (plus the lines of `prompt_file`) with seeds seed_start .. seed_start+seed_count-1."""
    options = dict(parameters)
    prompt_file, start, count = options.pop("prompt_file"), options.pop("seed_start"), options.pop("seed_count")
    if count < 1 or start < 0:
        raise StagediffError(f"seed range start {start} count {count}: start must be >= 0 and count >= 1")
    prompts = list(options.pop("prompts")) + (read_prompt_file(prompt_file) if prompt_file else [])
    return generate(prompts=prompts, seeds=list(range(start, start + count)), **options)


sweep = generation_flow("sweep", run_sweep, "Scheduled sweep over prompts × a seed range; generates what is missing.",
                        options=SWEEP_OPTIONS)
