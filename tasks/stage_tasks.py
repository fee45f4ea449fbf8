"""The encode / denoise / decode Prefect tasks. Each rebuilds the plan from the request (cheap), runs
one stage over the artifacts of the given keys (one unit of `stagediff.scheduler`; all without keys),
logs where it ran and its timings, publishes progress, and returns artifact URIs: never tensors. Their
results and parameters are JSON (no pickle), so long-lived stage workers on other machines
(`tasks.worker`) can run them. The stage code (torch and the models) is imported where a stage runs,
not where the tasks are submitted: a generate flow run imports this module and no torch."""

from __future__ import annotations

import os
import socket
import sys

from prefect import get_run_logger, task
from prefect.cache_policies import CachePolicy
from prefect.states import Cancelled

from stagediff.errors import StagediffError
from stagediff.plan import DECODE, DENOISE, ENCODE, SCORE, make_plan
from stagediff.progress import ProgressGroup, TqdmProgress
from stagediff.request import Request
from tasks.progress import ArtifactProgress
from tasks.records import STAGE_RECORDS
from tasks.run_watch import RunWatch, StageCancelled

RETRIES = 2
RETRY_DELAYS = [2, 10]


def _run_stage(stage: str, request: dict, keys: list[str] | None) -> list[str]:
    from stagediff.stages import run_stage

    logger = get_run_logger()
    plan = make_plan(Request(**request))
    terminal = (TqdmProgress(),) if sys.stderr.isatty() else ()
    progress = ProgressGroup(RunWatch(), ArtifactProgress(), *terminal)
    try:
        result = run_stage(stage, plan, keys, progress)
    except StageCancelled as cancelled:
        # Items finished before are in the store; the one in progress was never written (writes are atomic).
        logger.info("%s stopped: %s", stage, cancelled)
        return Cancelled(message=f"{stage} stopped: {cancelled}")
    finally:
        progress.close()
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
    batches = "+".join(str(size) for size in result.batch_sizes)
    logger.info("%s on %s: %d new of %d; %s%s; %.3fs per item, %s items per call",
                result.stage, where, result.computed, len(result.uris), loaded, compiled, per_item, batches)
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
def encode_task(request: dict, keys: list[str] | None = None) -> list[str]:
    """Embeddings for the request's prompts (those of `keys`); returns their URIs."""
    return _run_stage(ENCODE, request, keys)


@task(name="denoise", **STAGE_TASK_OPTIONS)
def denoise_task(request: dict, keys: list[str] | None = None) -> list[str]:
    """Latents for the request's (prompt, seed) items (those of the latents `keys`); returns their URIs."""
    return _run_stage(DENOISE, request, keys)


@task(name="decode", **STAGE_TASK_OPTIONS)
def decode_task(request: dict, keys: list[str] | None = None) -> list[str]:
    """Media files for the request's (prompt, seed) items (those of the latents `keys`); returns their URIs."""
    return _run_stage(DECODE, request, keys)


@task(name="score", **STAGE_TASK_OPTIONS)
def score_task(request: dict, keys: list[str] | None = None) -> list[str]:
    """Scores of the request's finished items (those of the latents `keys`) with its scorers (`--score`);
    returns the score files' URIs."""
    return _run_stage(SCORE, request, keys)


STAGE_TASKS = {ENCODE: encode_task, DENOISE: denoise_task, DECODE: decode_task, SCORE: score_task}
"""The stage tasks by stage name, in pipeline order."""
