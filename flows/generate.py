"""The `generate` flow: a batch of prompts × seeds through encode → denoise → decode.

The batch is split into chunks of prompts (all seeds of a prompt stay together, so one embedding
serves them). Chunks whose artifacts all exist are skipped; for the others each stage is submitted
once per chunk, so encoding the next chunk overlaps denoising the previous one. Stages run on the
warm stage workers, as flow runs of the stage deployments, or in-process (`flows.dispatch`).
"""

from __future__ import annotations

import math

from prefect import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows.dispatch import DEPLOYMENTS, WARM, resolve_dispatch, submit_stage
from flows.parameters import generation_flow
from flows.reporting import RunProgress, publish_results
from flows.stage_workers import ChunkRun, StageWorkerDispatch, live_workers
from stagediff.confinement import check_location, check_run_name
from stagediff.inventory import Inventory, plan_state
from stagediff.manifest import default_run_name
from stagediff.options import request_from_options
from stagediff.plan import make_plan
from tasks import write_manifest_task

PROMPTS_PER_CHUNK = {DEPLOYMENTS: 4, "in-process": 1}
"""On pools every chunk is a new flow-run process that loads its model: larger chunks amortise that.
In-process, models stay loaded and small chunks give the most overlap."""
WARM_CHUNKS_PER_ACCELERATOR = 2
MAX_ITEMS_PER_WARM_CHUNK = 32
"""On the warm stage workers models stay loaded, but each stage run costs a dispatch through the server
(a second or more end to end on a busy machine), so a batch has as few chunks as keep every
accelerator worker busy: two per worker (one denoising while the next is encoded or queued), more only
to keep a chunk within 32 items (a chunk's progress, and what a lost run takes back to the queue).
Measured on the 2-core VM, 24 items on one worker: 6 chunks of 4 items 21.7-22.8 s, 2 of 12 15.1-15.4 s."""
WHERE = {WARM: "on the stage workers", DEPLOYMENTS: "on their work pools", "in-process": "in-process"}


def chunk_parameters(parameters: dict, prompts: list[str | dict]) -> dict:
    """A chunk's parameters: its prompts, given in full (the prompt file was read once, for the run)."""
    return {**parameters, "prompts": prompts, "prompt_file": None}


def orchestrate(parameters: dict) -> str:
    logger = get_run_logger()
    request = request_from_options(parameters)
    check_run_name(parameters["run_name"])
    if parameters["manifest"]:
        check_location("manifest", parameters["manifest"])
    plan = make_plan(request)
    # One run, one revision: the stage runs get the commit the plan resolved (`org/name@<commit>`).
    request, parameters = plan.request, {**parameters, "model": plan.request.model}
    plan.store.check_writable()
    dispatch = resolve_dispatch(parameters["dispatch"])
    logger.info("%d items, stages %s", len(plan.items), WHERE[dispatch])

    prompts = [text if negative is None else {"prompt": text, "negative_prompt": negative}
               for text, negative in request.prompt_pairs]
    per_chunk = parameters["prompts_per_chunk"] or (
        warm_prompts_per_chunk(len(prompts), len(plan.items), live_workers(["denoise"])["denoise"])
        if dispatch == WARM else PROMPTS_PER_CHUNK[dispatch])
    inventory = Inventory(plan.store)
    progress = RunProgress(len(plan.items), done=plan_state(plan, inventory).done_items)
    chunks = []
    for first in range(0, len(prompts), per_chunk):
        params = chunk_parameters(parameters, prompts[first : first + per_chunk])
        state = plan_state(make_plan(request_from_options(params), model=plan.model), inventory)
        chunks.append(ChunkRun(params, state.missing_stages, items=len(state.media) - state.done_items))
    if dispatch == WARM:
        StageWorkerDispatch(chunks, on_chunk_done=lambda chunk: progress.advance(chunk.items)).run()
    else:
        run_chained(chunks, dispatch, progress)
    progress.finish()

    run_name = parameters["run_name"] or default_run_name(request.model)
    manifest_uri = write_manifest_task(request.to_dict(), run_name, parameters["manifest"])
    publish_results(plan, run_name)
    return manifest_uri


def warm_prompts_per_chunk(prompts: int, items: int, accelerators: int) -> int:
    """Prompts per chunk on the warm workers: `WARM_CHUNKS_PER_ACCELERATOR` chunks per accelerator
    worker, or more where chunks would exceed `MAX_ITEMS_PER_WARM_CHUNK` items."""
    chunks = max(WARM_CHUNKS_PER_ACCELERATOR * max(1, accelerators), math.ceil(items / MAX_ITEMS_PER_WARM_CHUNK))
    items_per_prompt = items // prompts
    per_chunk = math.ceil(prompts / chunks)
    return max(1, min(per_chunk, MAX_ITEMS_PER_WARM_CHUNK // items_per_prompt))


def run_chained(chunks: list[ChunkRun], dispatch: str, progress: RunProgress) -> None:
    """Submit every chunk's stages at once, each waiting for the one before it (the flow's threads
    wait, not a worker), and wait for them all."""
    pending = []
    for chunk in chunks:
        future = None
        for stage in chunk.stages:
            future = submit_stage(stage, chunk.parameters, dispatch, wait_for=[future] if future else [])
        if future is not None:
            pending.append((future, chunk))
    for future, chunk in pending:
        future.result()
        progress.advance(chunk.items)


generate = generation_flow(
    "generate",
    orchestrate,
    "Generate every prompt with every seed (encode → denoise → decode), reusing what the store holds.",
    task_runner=ThreadPoolTaskRunner(max_workers=4),
)
