"""Where the generate flow runs a batch's units (`stagediff.scheduler`):
- `warm`: on the long-lived stage workers (`tasks.worker`; see `flows.stage_workers`);
- `deployments` (ephemeral): each unit as a flow run of its stage's deployment on its work pool, a
  fresh process (or Kubernetes job) per run, linked as a subflow so the UI shows the tree;
- `in-process`: as tasks of the generate flow run itself.
`auto` picks the first that the server offers, in that order."""

from __future__ import annotations

import time

from prefect import task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.futures import wait

from flows.stage_workers import StageRunFailed, WarmExecutor, live_workers
from stagediff.plan import Plan
from stagediff.scheduler import Executor, local_lane
from tasks import STAGE_TASKS

WARM, DEPLOYMENTS, IN_PROCESS = "warm", "deployments", "in-process"
DISPATCH_CHOICES = ("auto", WARM, DEPLOYMENTS, IN_PROCESS)
DEPLOYMENT_NAME = "stagediff"
STAGE_DEPLOYMENTS = {stage: f"{stage}/{DEPLOYMENT_NAME}" for stage in STAGE_TASKS}
RUNS_PER_ACCELERATOR = 2
"""Stage flow runs of one stage in flight per accelerator the pool has."""


def resolve_dispatch(requested: str, stages) -> str:
    """`auto`: warm when a live stage worker serves each of the batch's `stages`, else their stage
    deployments when they all exist, else in-process. Other choices stand as given."""
    if requested != "auto":
        return requested
    if all(live_workers(stages).values()):
        return WARM
    return DEPLOYMENTS if stage_deployments_exist(stages) else IN_PROCESS


def stage_deployments_exist(stages) -> bool:
    """True when the server has a deployment for each of these stages' flows."""
    with get_client(sync_client=True) as client:
        for name in (STAGE_DEPLOYMENTS[stage] for stage in stages):
            try:
                client.read_deployment_by_name(name)
            except ObjectNotFound:
                return False
    return True


def executor_for(dispatch: str, plan: Plan, parameters: dict) -> Executor:
    """The executor of a (resolved) dispatch for a batch whose flow parameters are `parameters`."""
    if dispatch == WARM:
        return WarmExecutor(plan, parameters.get("stage_timeout"))
    if dispatch == DEPLOYMENTS:
        return DeploymentExecutor(parameters)
    return TaskExecutor(plan)


class TaskExecutor(Executor):
    """Units as task runs of the generate flow run, in its process: one at a time on a CPU alone, encode
    beside denoise and decode with an accelerator (as the CLI's `LocalExecutor`)."""

    def __init__(self, plan: Plan):
        # The stages run here: their libraries load anyway, and their placement is checked now.
        from stagediff.backends import overlaps_stages
        from stagediff.stages import STAGES, check_stage_placement

        for stage in STAGES:
            check_stage_placement(plan, stage)
        self.batch = plan.request
        self.overlap = overlaps_stages(plan.request.backend)

    def lane(self, stage):
        return local_lane(stage, self.overlap)

    def slots(self, stage):
        return 1

    def submit(self, unit, after):
        return STAGE_TASKS[unit.stage].submit(unit.request(self.batch).to_dict(), list(unit.keys), wait_for=after)

    def wait(self, handles, timeout):
        return list(wait(handles, timeout=timeout).done)

    def outcome(self, handle):
        handle.result()


@task(name="run-stage-deployment", task_run_name="{stage}-on-pool")
def start_stage_flow_run(stage: str, parameters: dict) -> str:
    """Start one flow run of the stage's deployment (a subflow of this run in the UI); returns its id."""
    return str(run_deployment(STAGE_DEPLOYMENTS[stage], parameters=parameters, timeout=0).id)


class DeploymentExecutor(Executor):
    """Units as flow runs of the stage deployments on their work pools."""

    def __init__(self, parameters: dict):
        from flows.stages import STAGE_FLOW_OPTIONS

        self.parameters = {option.name: parameters[option.name] for option in STAGE_FLOW_OPTIONS
                           if option.name in parameters}
        self.client = get_client(sync_client=True)
        self.client.__enter__()
        self.accelerators = self._pool_accelerators()

    def slots(self, stage):
        return RUNS_PER_ACCELERATOR * self.accelerators

    def submit(self, unit, after):
        return start_stage_flow_run(unit.stage, unit.parameters(self.parameters))

    def wait(self, handles, timeout):
        time.sleep(timeout)
        runs = self.client.read_flow_runs(flow_run_filter=FlowRunFilter(id={"any_": handles}))
        self.states = {str(run.id): run.state for run in runs}
        return [handle for handle in handles if self.states.get(handle) and self.states[handle].is_final()]

    def outcome(self, handle):
        state = self.states[handle]
        if not state.is_completed():
            raise StageRunFailed(f"stage flow run {handle} ended {state.name}: {state.message}")

    def close(self):
        self.client.__exit__(None, None, None)

    def _pool_accelerators(self) -> int:
        """The accelerators the denoise deployment's pool has: its concurrency limit when it has one (a
        Kubernetes pool starts a job per run), else its online workers (a process worker per
        accelerator)."""
        deployment = self.client.read_deployment_by_name(STAGE_DEPLOYMENTS["denoise"])
        pool = self.client.read_work_pool(deployment.work_pool_name)
        if pool.concurrency_limit:
            return pool.concurrency_limit
        workers = self.client.read_workers_for_work_pool(pool.name)
        return max(1, sum(worker.status == "ONLINE" for worker in workers))
