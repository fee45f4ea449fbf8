"""The `generate` flow: a batch of prompts × seeds through encode → denoise → decode.

The batch is split into chunks of prompts (all seeds of a prompt stay together, so one embedding
serves them). Chunks whose artifacts all exist are skipped; for the others each stage is submitted
once per chunk, so encoding the next chunk overlaps denoising the previous one. Stages run in-process
or, when the stage deployments exist on the server, as flow runs on their work pools.
"""

from __future__ import annotations

from prefect import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows.dispatch import stage_deployments_exist, submit_stage
from flows.parameters import generation_flow
from flows.reporting import RunProgress, publish_results
from stagediff.confinement import check_location, check_run_name
from stagediff.options import request_from_options
from stagediff.plan import make_plan
from stagediff.inventory import Inventory, plan_state
from stagediff.manifest import default_run_name
from tasks import write_manifest_task

IN_PROCESS_PROMPTS_PER_CHUNK = 1
"""In-process, stage models stay loaded between chunks: small chunks give the most overlap."""
POOLED_PROMPTS_PER_CHUNK = 4
"""On pools every chunk is a new flow-run process that loads its model: larger chunks amortise that."""


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
    plan.store.check_writable()
    dispatch = parameters["dispatch"]
    use_deployments = dispatch == "deployments" or (dispatch == "auto" and stage_deployments_exist())
    logger.info("%d items, stages %s", len(plan.items), "on their work pools" if use_deployments else "in-process")

    per_chunk = parameters["prompts_per_chunk"] or (POOLED_PROMPTS_PER_CHUNK if use_deployments else IN_PROCESS_PROMPTS_PER_CHUNK)
    prompts = [text if negative is None else {"prompt": text, "negative_prompt": negative}
               for text, negative in request.prompt_pairs]
    chunks = [prompts[i : i + per_chunk] for i in range(0, len(prompts), per_chunk)]
    inventory = Inventory(plan.store)
    progress = RunProgress(len(plan.items), done=plan_state(plan, inventory).done_items)
    pending = []
    for chunk in chunks:
        params = chunk_parameters(parameters, chunk)
        chunk_state = plan_state(make_plan(request_from_options(params), model=plan.model), inventory)
        future = None
        for stage in chunk_state.missing_stages:
            future = submit_stage(stage, params, use_deployments, wait_for=[future] if future else [])
        if future is not None:
            pending.append((future, len(chunk_state.media) - chunk_state.done_items))
    for future, items in pending:
        future.result()
        progress.advance(items)
    progress.finish()

    run_name = parameters["run_name"] or default_run_name(request.model)
    manifest_uri = write_manifest_task(request.to_dict(), run_name, parameters["manifest"])
    publish_results(plan, run_name)
    return manifest_uri


generate = generation_flow(
    "generate",
    orchestrate,
    "Generate every prompt with every seed (encode → denoise → decode), reusing what the store holds.",
    task_runner=ThreadPoolTaskRunner(max_workers=4),
)
