"""The `sweep` flow, meant to run on a schedule: prompts (a list, and/or a prompt file, local or in a
bucket) × a range of seeds, generating only what the store does not hold yet."""

from __future__ import annotations

from flows.generate import GENERATE_OPTIONS, generate
from flows.parameters import generation_flow
from stagediff.errors import StagediffError
from stagediff.options import Option

SWEEP_OPTIONS: tuple[Option, ...] = (
    *(o for o in GENERATE_OPTIONS if o.name != "seeds"),
    Option("seed_start", int, "the first seed", default=0),
    Option("seed_count", int, "how many seeds, from seed_start", default=8),
)


def run_sweep(parameters: dict) -> str:
    """Generate the prompts (and the prompt file's) with seeds seed_start .. seed_start+seed_count-1."""
    options = dict(parameters)
    start, count = options.pop("seed_start"), options.pop("seed_count")
    if count < 1 or start < 0:
        raise StagediffError(f"seed range start {start} count {count}: start must be >= 0 and count >= 1")
    return generate(seeds=[f"{start}-{start + count - 1}"], **options)


sweep = generation_flow("sweep", run_sweep, "Scheduled sweep over prompts × a seed range; generates what is missing.",
                        options=SWEEP_OPTIONS)
