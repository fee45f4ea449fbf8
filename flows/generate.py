"""The `generate` flow: a batch of prompts × seeds through encode → denoise → decode.

It plans the batch (nothing but Prefect and stagediff's light core is imported here: no torch), and
the scheduler (`stagediff.scheduler`) runs the units the store still lacks on the warm stage workers,
as flow runs of the stage deployments, or in-process (`flows.dispatch`), then writes the manifest and
the contact sheet; the UI gets the progress, the manifest table, a gallery and the contact sheet.
"""

from __future__ import annotations

from prefect import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows.dispatch import DISPATCH_CHOICES, executor_for, resolve_dispatch
from flows.parameters import generation_flow
from flows.reporting import RunProgress, publish_results
from stagediff.confinement import check_location, check_run_name
from stagediff.errors import StagediffError
from stagediff.manifest import default_run_name
from stagediff.options import GENERATION_OPTIONS, RUN_OPTIONS, Option, request_from_options
from stagediff.plan import make_plan
from stagediff.scheduler import BatchRun

ORCHESTRATION_OPTIONS: tuple[Option, ...] = (
    Option("dispatch", str, "where stages run: warm (long-lived stage workers), deployments (a flow run per "
           "stage run on the work pools), in-process, or auto: the first of these the server offers",
           choices=DISPATCH_CHOICES, default="auto"),
    Option("unit_items", int, "items per denoise and decode run (default: two runs per accelerator worker, at most "
           "32 items each)"),
    Option("stage_timeout", float, "seconds the batch waits for a stage worker while none serves a stage it needs "
           "(warm dispatch: a node pool scaled to zero), then fails", default=3600.0),
    Option("resumed", int, "how many runs of this batch crashed before this one (set by the resume automation of "
           "prefect.yaml, which runs the batch again when its run crashes)", default=0),
)
"""How the generate flow spreads the work."""

MAX_RESUMES = 3
"""Crashed runs of one batch that the resume automation runs again; the next one fails at once."""

GENERATE_OPTIONS = GENERATION_OPTIONS + RUN_OPTIONS + ORCHESTRATION_OPTIONS
WHERE = {"warm": "on the stage workers", "deployments": "on their work pools", "in-process": "in-process"}


def orchestrate(parameters: dict) -> str:
    logger = get_run_logger()
    if parameters["resumed"] > MAX_RESUMES:
        raise StagediffError(f"this batch's run crashed {parameters['resumed']} times: not resuming it again "
                             "(run it again by hand once the cause is fixed; it resumes from the store)")
    if parameters["resumed"]:
        logger.info("Resuming a batch whose run crashed (resume %d of at most %d)", parameters["resumed"], MAX_RESUMES)
    request = request_from_options(parameters)
    check_run_name(parameters["run_name"])
    if parameters["manifest"]:
        check_location("manifest", parameters["manifest"])
    plan = make_plan(request)
    # One run, one revision: the stage runs get the commit the plan resolved (`org/name@<commit>`).
    request, parameters = plan.request, {**parameters, "model": plan.request.model}
    plan.store.check_writable()
    dispatch = resolve_dispatch(parameters["dispatch"], plan.stages)
    logger.info("%d items, stages %s", len(plan.items), WHERE[dispatch])
    run_name = parameters["run_name"] or default_run_name(request.model)
    progress = RunProgress()
    batch = BatchRun(plan, executor_for(dispatch, plan, parameters), run_name, parameters["manifest"],
                     on_progress=progress.update, log=logger.info, unit_items=parameters["unit_items"])
    manifest_uri = batch.run()
    publish_results(plan, run_name)
    return manifest_uri


generate = generation_flow(
    "generate",
    orchestrate,
    "Generate every prompt with every seed (encode → denoise → decode), reusing what the store holds.",
    options=GENERATE_OPTIONS,
    task_runner=ThreadPoolTaskRunner(max_workers=4),
)
