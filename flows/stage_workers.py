"""The warm way to run a batch's units: each goes to the long-lived stage workers (`tasks.worker`) as a
task run of the generate flow run, so the UI shows it under the run (with an edge from the units it
waited for). The scheduler submits a unit only once those have finished, so no worker holds its one
slot waiting for upstream work.

Stage workers acknowledge a run only once it has finished, so the server gives the run of a worker
that dies to another worker by itself. What the server cannot give back is kept in memory only and
lost when it restarts: runs waiting in its queue, and runs whose worker died meanwhile. The executor
finds those from the workers' heartbeats and submits them again (the store makes that idempotent):
- a started run that no worker has named as its current run for `LOST_AFTER_SECONDS`;
- a waiting run while a worker serving its stage has been idle for `IDLE_PROOF_SECONDS`: an idle
  worker takes any queued run of its stages within a second.
While no worker serves a stage that runs wait for (every accelerator gone, a node pool scaled to zero),
it says so at once, in the logs and an artifact, waits `stage_timeout` seconds for one, then fails.
"""

from __future__ import annotations

import datetime
import threading
import time
from dataclasses import dataclass, field
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterId
from prefect.client.schemas.objects import TaskRun, TaskRunResult
from prefect.futures import PrefectDistributedFuture
from prefect.states import Crashed, State

from stagediff.plan import Plan
from stagediff.scheduler import Executor, Unit
from tasks import STAGE_TASKS
from tasks.heartbeats import HEARTBEAT_SECONDS, Heartbeats, read_heartbeats

CHECK_SECONDS = 10.0
"""How often it looks for lost runs and counts the live workers."""
LOST_AFTER_SECONDS = 6 * HEARTBEAT_SECONDS
IDLE_PROOF_SECONDS = 3 * HEARTBEAT_SECONDS
DEFAULT_STAGE_TIMEOUT = 3600.0
"""Seconds to wait for a worker while none serves a stage that runs wait for."""
QUEUED_PER_WORKER = 2
"""Runs of a stage in flight per live worker serving it: enough to keep every worker busy, and the
server's in-memory queue (at most 1000 runs) short."""


class StageRunFailed(RuntimeError):
    """A stage run ended in a state other than Completed."""


def live_workers(stages) -> dict[str, int]:
    """How many stage workers serving each stage are connected to the server now."""
    keys = {STAGE_TASKS[stage].task_key: stage for stage in stages}
    with get_client(sync_client=True) as client:
        response = client.request("POST", "/task_workers/filter",
                                  json={"task_worker_filter": {"task_keys": list(keys)}})
    counts = dict.fromkeys(stages, 0)
    for worker in response.json():
        for key in worker["task_keys"]:
            if key in keys:
                counts[keys[key]] += 1
    return counts


@dataclass(eq=False)
class StageRun:
    """A unit on the stage workers: its current task run (a lost one is replaced by a new one)."""

    unit: Unit
    request: dict
    upstream: list[UUID] = field(default_factory=list)
    """The task runs of the units it waited for (the UI's edges)."""
    run: UUID | None = None
    future: PrefectDistributedFuture | None = None
    submitted_at: datetime.datetime | None = None
    started_seen: float | None = None
    """When the executor first saw the current run started (monotonic)."""
    state: State | None = None
    """Its final state, once it has one."""

    @property
    def stage(self) -> str:
        return self.unit.stage


def proves_lost(heartbeats: Heartbeats, stage_run: StageRun) -> bool:
    """A worker serving the run's stage was idle for IDLE_PROOF_SECONDS while the run waited."""
    return any(
        stage_run.stage in report.stages
        and min(report.idle_seconds, (report.when - stage_run.submitted_at).total_seconds()) >= IDLE_PROOF_SECONDS
        for report in heartbeats.idle
    )


class WarmExecutor(Executor):
    """Runs units on the stage workers connected to the server."""

    def __init__(self, plan: Plan, stage_timeout: float | None = None):
        self.batch = plan.request
        self.stage_timeout = DEFAULT_STAGE_TIMEOUT if stage_timeout is None else stage_timeout
        self.unserved_since: dict[str, float] = {}
        """Stage -> since when (monotonic) runs of it wait while no worker serves it."""
        self.logger = get_run_logger()
        self.client = get_client(sync_client=True)
        self.client.__enter__()
        self.heard_final: set[UUID] = set()
        """Runs the event stream said finished (their state may not be in the API yet)."""
        self.wake = threading.Event()
        self.capacity: dict[str, int] = {}
        self.workers: dict[str, int] = {}
        workers = self._count_workers()
        self.accelerators = max(1, workers["denoise"])
        self.logger.info("stage workers: %s", ", ".join(f"{stage} ×{count}" for stage, count in workers.items()))
        self.next_check = time.monotonic() + CHECK_SECONDS

    def slots(self, stage):
        return self.capacity[stage]

    def submit(self, unit, after):
        stage_run = StageRun(unit, unit.request(self.batch).to_dict(), upstream=[handle.run for handle in after])
        self._start(stage_run)
        return stage_run

    def wait(self, handles, timeout):
        self.wake.wait(timeout)
        self.wake.clear()
        runs = self._read_runs([handle.run for handle in handles])
        finished = [handle for handle in handles if self._finished(handle, runs.get(handle.run))]
        if time.monotonic() >= self.next_check:
            self._resubmit_lost([handle for handle in handles if handle not in finished], runs)
            self._count_workers()
            self.next_check = time.monotonic() + CHECK_SECONDS
        self._check_served([handle for handle in handles if handle not in finished])
        return finished

    def outcome(self, handle):
        if not handle.state.is_completed():
            raise StageRunFailed(f"{handle.stage} run {handle.run} ended {handle.state.name}: {handle.state.message}")

    def close(self):
        self.client.__exit__(None, None, None)

    def _start(self, stage_run: StageRun) -> None:
        dependencies = {"request": {TaskRunResult(id=run) for run in stage_run.upstream}} if stage_run.upstream else None
        future = STAGE_TASKS[stage_run.stage].apply_async(
            kwargs={"request": stage_run.request, "keys": list(stage_run.unit.keys)}, dependencies=dependencies)
        stage_run.run, stage_run.future, stage_run.started_seen = future.task_run_id, future, None
        stage_run.submitted_at = datetime.datetime.now(datetime.timezone.utc)
        future.add_done_callback(self._heard_finished)

    def _heard_finished(self, future: PrefectDistributedFuture) -> None:
        """Called from Prefect's event-stream thread."""
        self.heard_final.add(future.task_run_id)
        self.wake.set()

    def _read_runs(self, ids: list[UUID]) -> dict[UUID, TaskRun]:
        runs = self.client.read_task_runs(task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=ids)), limit=len(ids))
        return {run.id: run for run in runs}

    def _finished(self, stage_run: StageRun, run: TaskRun | None) -> bool:
        if run is None:
            raise StageRunFailed(f"{stage_run.stage} run {stage_run.run} was deleted: a stage worker could not read "
                                 "its parameters (do all machines share Prefect's task storage?)")
        state = run.state
        if stage_run.run in self.heard_final and not (state and state.is_final()):
            # The event stream heard the final state before the API has it.
            stage_run.future.wait(timeout=0)
            state = stage_run.future.state
        if state is None or not state.is_final():
            if state is not None and not state.is_scheduled() and stage_run.started_seen is None:
                stage_run.started_seen = time.monotonic()
            return False
        stage_run.state = state
        return True

    def _resubmit_lost(self, stage_runs: list[StageRun], runs: dict[UUID, TaskRun]) -> None:
        heartbeats = read_heartbeats(self.client, LOST_AFTER_SECONDS)
        for stage_run in stage_runs:
            run = runs.get(stage_run.run)
            if run is None or run.state is None or run.state.is_final() or heartbeats.reported_running(stage_run.run):
                continue
            if run.state.is_scheduled() and run.run_count == 0:  # not an attempt awaiting its retry
                lost = proves_lost(heartbeats, stage_run)
                reason = "the server no longer queued it (a worker serving its stage stayed idle)"
            else:
                lost = (stage_run.started_seen is not None
                        and time.monotonic() - stage_run.started_seen > LOST_AFTER_SECONDS)
                reason = f"no stage worker has reported it for {LOST_AFTER_SECONDS:.0f}s"
            if lost:
                self.client.set_task_run_state(stage_run.run, Crashed(message=f"lost: {reason}; submitted again"),
                                               force=True)
                self._start(stage_run)
                self.logger.warning("%s run %s was lost (%s); submitted again as %s", stage_run.stage, run.name,
                                    reason, stage_run.run)

    def _check_served(self, waiting: list[StageRun]) -> None:
        """Say at once when runs wait for a stage that no live worker serves; fail after `stage_timeout`."""
        now = time.monotonic()
        unserved = {stage_run.stage for stage_run in waiting if not self.workers.get(stage_run.stage)}
        for stage in sorted(unserved):
            since = self.unserved_since.setdefault(stage, now)
            if since == now:
                message = (f"No stage worker serves {stage}: its runs wait until one connects "
                           f"(python -m tasks.worker --stages ...), at most {self.stage_timeout:.0f}s (stage_timeout)")
                self.logger.warning(message)
                create_markdown_artifact(
                    f"## No stage worker serves `{stage}`\n\n{message}.\n\nStart one, or scale its node pool up.",
                    description=f"No stage worker serves {stage}")
            elif now - since > self.stage_timeout:
                raise StageRunFailed(f"No stage worker served {stage} for {self.stage_timeout:.0f}s (stage_timeout); "
                                     "the batch stops here and resumes from the store when run again")
        for stage in set(self.unserved_since) - unserved:
            del self.unserved_since[stage]
            self.logger.info("A stage worker serves %s again", stage)

    def _count_workers(self) -> dict[str, int]:
        workers = live_workers(STAGE_TASKS)
        self.workers = workers
        for stage, count in workers.items():
            self.capacity[stage] = QUEUED_PER_WORKER * max(1, count)
        return workers
