"""The `sweep` flow, meant to run on a schedule: prompts (a list, and/or a prompt file, local or in a
bucket) × a range of seeds, generating only what the store does not hold yet. A scored sweep (`scores`)
publishes the trend of its runs' mean scores: runs without a `run_name` are named
`sweep-<deployment>-<UTC time>`, and the trend reads the manifests of every run with that prefix (or, with
a `run_name`, of the runs whose names start with it)."""

from __future__ import annotations

import time

from flows.generate import GENERATE_OPTIONS, generate
from flows.parameters import generation_flow
from flows.reporting import publish_trend
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
    prefix = options.get("run_name") or sweep_run_prefix()
    if not options.get("run_name"):
        options["run_name"] = f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    manifest_uri = generate(seeds=[f"{start}-{start + count - 1}"], **options)
    if options.get("scores"):
        from stagediff.store import Store

        publish_trend(Store(options["store"]), prefix, options["run_name"])
    return manifest_uri


def sweep_run_prefix() -> str:
    """`sweep-<deployment name>` (`sweep-local` for a run not started from a deployment): its runs' names."""
    from prefect.runtime import deployment

    name = deployment.name or "local"
    return "sweep-" + "".join(c if c.isalnum() or c in "._-" else "-" for c in name.lower())


sweep = generation_flow("sweep", run_sweep, "Scheduled sweep over prompts × a seed range; generates what is missing.",
                        options=SWEEP_OPTIONS)
