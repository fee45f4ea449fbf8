"""The encode / denoise / decode Prefect tasks. Each rebuilds the plan from the request (cheap),
calls one stage, logs timings, and returns artifact URIs: never tensors."""

from __future__ import annotations

import sys

from prefect import get_run_logger, task

from stagediff import manifest, stages
from stagediff.plan import make_plan
from stagediff.progress import Progress, TqdmProgress
from stagediff.request import Request

RETRIES = 2
RETRY_DELAYS = [2, 10]


def _progress() -> Progress:
    return TqdmProgress() if sys.stderr.isatty() else Progress()


def _run_stage(stage, request: dict, **selection) -> list[str]:
    plan = make_plan(Request(**request))
    result = stage(plan, progress=_progress(), **selection)
    logger = get_run_logger()
    if result.computed:
        per_item = sum(result.item_seconds) / len(result.item_seconds)
        logger.info(
            "%s: %d new of %d; load %.2fs, compile %.2fs, %.3fs per item",
            result.stage, result.computed, len(result.uris), result.load_seconds, result.compile_seconds, per_item,
        )
    else:
        logger.info("%s: all %d artifacts already in the store", result.stage, len(result.uris))
    return result.uris


@task(name="encode", retries=RETRIES, retry_delay_seconds=RETRY_DELAYS)
def encode_task(request: dict, prompts: list[str] | None = None) -> list[str]:
    """Embeddings for these prompts (all of the request's when None); returns their URIs."""
    return _run_stage(stages.encode, request, prompts=prompts)


@task(name="denoise", retries=RETRIES, retry_delay_seconds=RETRY_DELAYS)
def denoise_task(request: dict, prompts: list[str] | None = None, seeds: list[int] | None = None) -> list[str]:
    """Latents for these (prompt, seed) items; returns their URIs."""
    return _run_stage(stages.denoise, request, prompts=prompts, seeds=seeds)


@task(name="decode", retries=RETRIES, retry_delay_seconds=RETRY_DELAYS)
def decode_task(request: dict, prompts: list[str] | None = None, seeds: list[int] | None = None) -> list[str]:
    """Media files for these (prompt, seed) items; returns their URIs."""
    return _run_stage(stages.decode, request, prompts=prompts, seeds=seeds)


@task(name="write-manifest")
def write_manifest_task(request: dict, run_name: str, copy_to: str | None = None) -> str:
    """Write runs/<run_name>/manifest.json (and a copy at `copy_to`); returns its URI."""
    return manifest.write_manifest(make_plan(Request(**request)), run_name, copy_to)
