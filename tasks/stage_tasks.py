"""The encode / denoise / decode Prefect tasks. Each rebuilds the plan from the request (cheap),
calls one stage, logs where it ran and its timings, publishes progress, and returns artifact URIs:
never tensors. Their results and parameters are JSON (no pickle), so long-lived stage workers on
other machines (`tasks.worker`) can run them."""

from __future__ import annotations

import os
import socket
import sys

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE, CachePolicy

from stagediff import manifest, stages
from stagediff.errors import StagediffError
from stagediff.plan import make_plan
from stagediff.progress import ProgressGroup, TqdmProgress
from stagediff.request import Request
from tasks.progress import ArtifactProgress
from tasks.records import STAGE_RECORDS

RETRIES = 2
RETRY_DELAYS = [2, 10]


def _run_stage(stage, request: dict) -> list[str]:
    logger = get_run_logger()
    plan = make_plan(Request(**request))
    terminal = (TqdmProgress(),) if sys.stderr.isatty() else ()
    result = stage(plan, progress=ProgressGroup(ArtifactProgress(), *terminal))
    where = f"{socket.gethostname()} (pid {os.getpid()})"
    if not result.computed:
        logger.info("%s on %s: all %d artifacts already in the store", result.stage, where, len(result.uris))
        return result.uris
    # A pipeline the worker already holds costs no load time at all.
    loaded = (f"loaded {plan.request.model} in {result.load_seconds:.2f}s" if result.load_seconds
              else f"{plan.request.model} already loaded")
    compiled = (f", compiled {result.compiles} shapes in {result.compile_seconds:.2f}s "
                f"({result.compile_cache_hits} from the persistent cache)" if result.compiles else ", compiled nothing")
    per_item = sum(result.item_seconds) / len(result.item_seconds)
    logger.info("%s on %s: %d new of %d; %s%s; %.3fs per item",
                result.stage, where, result.computed, len(result.uris), loaded, compiled, per_item)
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


class OneResultPerTaskRun(CachePolicy):
    """The result is stored under the task run's id: never reused by another run (the store, not
    Prefect's cache, decides reuse), yet persisted where the flow that submitted the run reads it.
    (Task workers replace NO_CACHE with an input-hash policy, which would reuse results.)"""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str:
        return f"stage-results/{task_ctx.task_run.id}"


STAGE_TASK_OPTIONS = dict(
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=_retry_unless_bad_input,
    cache_policy=OneResultPerTaskRun(),
    persist_result=True,
    result_serializer=STAGE_RECORDS,
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


STAGE_TASKS = {"encode": encode_task, "denoise": denoise_task, "decode": decode_task}
"""The stage tasks by stage name, in pipeline order."""


@task(name="score", **STAGE_TASK_OPTIONS)
def score_task(request: dict) -> list[str]:
    """Scores of the request's finished items with its scorers (`--score`); returns the score files' URIs."""
    return _run_stage(lambda plan, progress: stages.run_stage("score", plan, progress=progress), request)


@task(name="write-manifest", cache_policy=NO_CACHE)
def write_manifest_task(request: dict, run_name: str, copy_to: str | None = None) -> str:
    """Write runs/<run_name>/manifest.json (and a copy at `copy_to`); returns its URI."""
    return manifest.write_manifest(make_plan(Request(**request)), run_name, copy_to)
