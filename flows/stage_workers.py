"""The warm way to run a batch: each chunk's stages go, one after the other, to the long-lived stage
workers (`tasks.worker`) as task runs of the generate flow run, so the UI shows them under it.

The flow, not the worker, sequences a chunk's stages: a stage is submitted only once the one before
it has finished, so no worker holds its one slot waiting for upstream work, and chunks move
independently: the encode worker encodes the next chunk while accelerator workers denoise earlier
ones, each accelerator worker on a different chunk.

Stage workers acknowledge a run only once it has finished, so the server gives the run of a worker
that dies to another worker by itself. What the server cannot give back is kept in memory only and
lost when it restarts: runs waiting in its queue, and runs whose worker died meanwhile. The flow
finds those from the workers' heartbeats and submits them again (the store makes that idempotent):
- a started run that no worker has named as its current run for `LOST_AFTER_SECONDS`;
- a waiting run while a worker serving its stage has been idle for `IDLE_PROOF_SECONDS`: an idle
  worker takes any queued run of its stages within a second.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from uuid import UUID

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterId
from prefect.client.schemas.objects import TaskRun, TaskRunResult
from prefect.futures import PrefectDistributedFuture
from prefect.states import Crashed, State

from stagediff.options import request_from_options
from tasks import STAGE_TASKS
from tasks.heartbeats import HEARTBEAT_SECONDS, Heartbeats, read_heartbeats

POLL_SECONDS = 0.5
"""How often the flow reads the states of its stage runs from the API (latency between a chunk's
stages). The server's event stream wakes it sooner when a run's final state arrives there first;
either can lag by seconds on a busy server."""
CHECK_SECONDS = 10.0
"""How often it looks for lost runs."""
LOST_AFTER_SECONDS = 6 * HEARTBEAT_SECONDS
IDLE_PROOF_SECONDS = 3 * HEARTBEAT_SECONDS
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


@dataclass
class ChunkRun:
    """One chunk of the batch: its flow parameters and the stages it still needs, in order."""

    parameters: dict
    stages: list[str]
    items: int = 0
    """Its items the store does not hold yet."""
    run: UUID | None = None
    """The task run of its current stage."""
    future: PrefectDistributedFuture | None = None
    submitted_at: datetime.datetime | None = None
    started_seen: float | None = None
    """When the flow first saw the current run started (monotonic)."""


def proves_lost(heartbeats: Heartbeats, chunk: ChunkRun) -> bool:
    """A worker serving the chunk's stage was idle for IDLE_PROOF_SECONDS while the run waited."""
    stage = chunk.stages[0]
    return any(
        stage in report.stages
        and min(report.idle_seconds, (report.when - chunk.submitted_at).total_seconds()) >= IDLE_PROOF_SECONDS
        for report in heartbeats.idle
    )


class StageWorkerDispatch:
    """Runs chunks' stages on the stage workers; `run()` returns when every chunk has finished."""

    def __init__(self, chunks: list[ChunkRun], on_chunk_done: Callable[[ChunkRun], None]):
        self.waiting = [chunk for chunk in chunks if chunk.stages]
        self.in_flight: dict[UUID, ChunkRun] = {}
        self.on_chunk_done = on_chunk_done
        self.heard_final: set[UUID] = set()
        """Runs the event stream said finished (their state may not be in the API yet)."""
        self.wake = threading.Event()
        self.logger = get_run_logger()
        self.capacity = dict.fromkeys(STAGE_TASKS, QUEUED_PER_WORKER)

    def run(self) -> None:
        next_check = time.monotonic() + CHECK_SECONDS
        with get_client(sync_client=True) as client:
            workers = self._update_capacity()
            self.logger.info("%d chunks for the stage workers (%s connected)", len(self.waiting),
                             ", ".join(f"{stage} ×{count}" for stage, count in workers.items()))
            self._submit_ready()
            while self.in_flight:
                self.wake.wait(POLL_SECONDS)
                self.wake.clear()
                runs = self._read_runs(client)
                for run_id, chunk in list(self.in_flight.items()):
                    self._follow(chunk, runs.get(run_id))
                if time.monotonic() >= next_check and self.in_flight:
                    self._resubmit_lost(client, runs)
                    self._update_capacity()
                    next_check = time.monotonic() + CHECK_SECONDS
                self._submit_ready()

    def _submit_ready(self) -> None:
        in_flight = [chunk.stages[0] for chunk in self.in_flight.values()]
        for chunk in list(self.waiting):
            stage = chunk.stages[0]
            if in_flight.count(stage) < self.capacity[stage]:
                self.waiting.remove(chunk)
                self._submit(chunk)
                in_flight.append(stage)

    def _submit(self, chunk: ChunkRun, after: UUID | None = None) -> None:
        request = request_from_options(chunk.parameters).to_dict()
        upstream = {"request": {TaskRunResult(id=after)}} if after else None  # the UI draws the edge
        future = STAGE_TASKS[chunk.stages[0]].apply_async(kwargs={"request": request}, dependencies=upstream)
        chunk.run, chunk.future, chunk.started_seen = future.task_run_id, future, None
        chunk.submitted_at = datetime.datetime.now(datetime.timezone.utc)
        self.in_flight[chunk.run] = chunk
        future.add_done_callback(self._heard_finished)

    def _heard_finished(self, future: PrefectDistributedFuture) -> None:
        """Called from Prefect's event-stream thread."""
        self.heard_final.add(future.task_run_id)
        self.wake.set()

    def _state(self, chunk: ChunkRun, run: TaskRun) -> State | None:
        """The run's state: the final one from the event stream when heard, else the API's."""
        if chunk.run in self.heard_final and not (run.state and run.state.is_final()):
            chunk.future.wait(timeout=0)
            return chunk.future.state
        return run.state

    def _read_runs(self, client) -> dict[UUID, TaskRun]:
        ids = list(self.in_flight)
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=ids)), limit=len(ids))
        return {run.id: run for run in runs}

    def _follow(self, chunk: ChunkRun, run: TaskRun | None) -> None:
        stage = chunk.stages[0]
        if run is None:
            raise StageRunFailed(f"{stage} run {chunk.run} was deleted: a stage worker could not read its "
                                 "parameters (do all machines share Prefect's task storage?)")
        state = self._state(chunk, run)
        if state is None or not state.is_final():
            if state is not None and not state.is_scheduled() and chunk.started_seen is None:
                chunk.started_seen = time.monotonic()
            return
        if not state.is_completed():
            raise StageRunFailed(f"{stage} run {run.name} ended {state.name}: {state.message}")
        del self.in_flight[chunk.run]
        finished = chunk.run
        chunk.stages.pop(0)
        if chunk.stages:
            self._submit(chunk, after=finished)
        else:
            self.on_chunk_done(chunk)

    def _resubmit_lost(self, client, runs: dict[UUID, TaskRun]) -> None:
        heartbeats = read_heartbeats(client, LOST_AFTER_SECONDS)
        for run_id, chunk in list(self.in_flight.items()):
            run = runs.get(run_id)
            if run is None or run.state is None or run.state.is_final():
                continue
            if heartbeats.reported_running(run_id):
                continue
            if run.state.is_scheduled() and run.run_count == 0:  # not an attempt awaiting its retry
                lost = proves_lost(heartbeats, chunk)
                reason = "the server no longer queued it (a worker serving its stage stayed idle)"
            else:
                lost = chunk.started_seen is not None and time.monotonic() - chunk.started_seen > LOST_AFTER_SECONDS
                reason = f"no stage worker has reported it for {LOST_AFTER_SECONDS:.0f}s"
            if lost:
                client.set_task_run_state(run_id, Crashed(message=f"lost: {reason}; submitted again"), force=True)
                del self.in_flight[run_id]
                self._submit(chunk)
                self.logger.warning("%s run %s was lost (%s); submitted again as %s", chunk.stages[0], run.name,
                                    reason, chunk.run)

    def _update_capacity(self) -> dict[str, int]:
        workers = live_workers(STAGE_TASKS)
        for stage, count in workers.items():
            self.capacity[stage] = QUEUED_PER_WORKER * max(1, count)
        return workers
