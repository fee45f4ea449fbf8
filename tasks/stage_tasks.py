"""The encode / denoise / decode Prefect tasks. Each rebuilds the plan from the request (cheap),
calls one stage, logs timings, publishes progress, and returns artifact URIs: never tensors."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from stagediff import manifest, stages
from stagediff.errors import StagediffError
from stagediff.plan import make_plan
from stagediff.progress import ProgressGroup, TqdmProgress
from stagediff.request import Request
from tasks.progress import ArtifactProgress

RETRIES = 2
RETRY_DELAYS = [2, 10]
FAIL_ONCE_VARIABLE = "STAGEDIFF_FAIL_ONCE"


class InjectedFailure(RuntimeError):
    """A transient failure raised on purpose (fault-injection switch, see `_fail_once_if_asked`)."""


def _fail_once_if_asked(stage: str) -> None:
    """Fault injection for testing retries: `STAGEDIFF_FAIL_ONCE=<stage>:<marker-file>` makes the
    first attempt of that stage fail (creating the marker); later attempts run normally."""
    switch = os.environ.get(FAIL_ONCE_VARIABLE, "")
    target, _, marker = switch.partition(":")
    if target == stage and marker and not Path(marker).exists():
        Path(marker).touch()
        raise InjectedFailure(f"{stage}: injected transient failure ({FAIL_ONCE_VARIABLE})")


def _run_stage(stage, request: dict) -> list[str]:
    logger = get_run_logger()
    _fail_once_if_asked(stage.__name__)
    plan = make_plan(Request(**request))
    terminal = (TqdmProgress(),) if sys.stderr.isatty() else ()
    result = stage(plan, progress=ProgressGroup(ArtifactProgress(), *terminal))
    if result.computed:
        per_item = sum(result.item_seconds) / len(result.item_seconds)
        compiled = (
            f", compile {result.compile_seconds:.2f}s ({result.compiles} shapes, {result.compile_cache_hits} from cache)"
            if result.compiles
            else ""
        )
        logger.info(
            "%s: %d new of %d; model load %.2fs%s, %.3fs per item",
            result.stage, result.computed, len(result.uris), result.load_seconds, compiled, per_item,
        )
    else:
        logger.info("%s: all %d artifacts already in the store", result.stage, len(result.uris))
    return result.uris


# Bad input is not transient: retrying a StagediffError would only repeat it.
def _retry_unless_bad_input(task, task_run, state) -> bool:
    try:
        state.result()
    except StagediffError:
        return False
    except Exception:
        return True
    return True


# The store decides reuse (content-addressed artifacts), not Prefect's task cache.
STAGE_TASK_OPTIONS = dict(
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=_retry_unless_bad_input,
    cache_policy=NO_CACHE,
)


@task(name="encode", **STAGE_TASK_OPTIONS)
def encode_task(request: dict) -> list[str]:
    """Embeddings for the request's prompts; returns their URIs."""
    return _run_stage(stages.encode, request)


@task(name="denoise", **STAGE_TASK_OPTIONS)
def denoise_task(request: dict) -> list[str]:
    """Latents for the request's (prompt, seed) items; returns their URIs."""
    return _run_stage(stages.denoise, request)


@task(name="decode", **STAGE_TASK_OPTIONS)
def decode_task(request: dict) -> list[str]:
    """Media files for the request's (prompt, seed) items; returns their URIs."""
    return _run_stage(stages.decode, request)


@task(name="write-manifest", cache_policy=NO_CACHE)
def write_manifest_task(request: dict, run_name: str, copy_to: str | None = None) -> str:
    """Write runs/<run_name>/manifest.json (and a copy at `copy_to`); returns its URI."""
    return manifest.write_manifest(make_plan(Request(**request)), run_name, copy_to)
