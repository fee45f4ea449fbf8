"""Where the generate flow runs the stages of a batch:
- `warm`: on the long-lived stage workers (`tasks.worker`; see `flows.stage_workers`);
- `deployments` (ephemeral): each stage of each chunk as a flow run of the stage's deployment on its
  work pool (`run_deployment`, linked as a subflow so the UI shows the tree), a fresh process per run;
- `in-process`: as tasks of the generate flow run itself.
`auto` picks the first that the server offers, in that order."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from flows.stage_workers import StageRunFailed, live_workers
from stagediff.options import request_from_options
from tasks import STAGE_TASKS

WARM, DEPLOYMENTS, IN_PROCESS = "warm", "deployments", "in-process"
DISPATCH_CHOICES = ("auto", WARM, DEPLOYMENTS, IN_PROCESS)
DEPLOYMENT_NAME = "stagediff"
STAGE_DEPLOYMENTS = {stage: f"{stage}/{DEPLOYMENT_NAME}" for stage in STAGE_TASKS}
POLL_SECONDS = 1.0


def resolve_dispatch(requested: str) -> str:
    """`auto`: warm when a live stage worker serves every stage, else the stage deployments when they
    all exist, else in-process. Other choices stand as given."""
    if requested != "auto":
        return requested
    if all(live_workers(STAGE_TASKS).values()):
        return WARM
    return DEPLOYMENTS if stage_deployments_exist() else IN_PROCESS


def stage_deployments_exist() -> bool:
    """True when the server has a deployment for every stage flow."""
    with get_client(sync_client=True) as client:
        for name in STAGE_DEPLOYMENTS.values():
            try:
                client.read_deployment_by_name(name)
            except ObjectNotFound:
                return False
    return True


@task(name="run-stage-deployment", task_run_name="{stage}-on-pool", cache_policy=NO_CACHE)
def run_stage_deployment(stage: str, parameters: dict) -> str:
    """Run the stage's deployment for one chunk and wait for it; returns the flow run id."""
    flow_run = run_deployment(STAGE_DEPLOYMENTS[stage], parameters=parameters, poll_interval=POLL_SECONDS, timeout=None)
    if not flow_run.state or not flow_run.state.is_completed():
        raise StageRunFailed(f"{stage} flow run {flow_run.name} ended {flow_run.state.name if flow_run.state else 'unknown'}")
    return str(flow_run.id)


def submit_stage(stage: str, chunk_parameters: dict, dispatch: str, wait_for):
    """Submit one stage for one chunk, after `wait_for`, to a deployment or in-process; returns a future."""
    if dispatch == DEPLOYMENTS:
        return run_stage_deployment.submit(stage, chunk_parameters, wait_for=wait_for)
    return STAGE_TASKS[stage].submit(request_from_options(chunk_parameters).to_dict(), wait_for=wait_for)
