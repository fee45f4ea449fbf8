"""A stage run watched from inside, between denoise steps and items: it stops when its run or its flow
run is cancelled (the UI's Cancel on the generate run reaches runs a warm worker has already taken),
and it tells the worker's heartbeat that it advances (`tasks.heartbeats.progress_made`)."""

from __future__ import annotations

import time

from prefect.client.orchestration import get_client
from prefect.context import TaskRunContext

from stagediff.progress import Progress
from tasks.heartbeats import progress_made

CHECK_SECONDS = 1.0
"""How often, at most, the run's state is read while it advances."""


class StageCancelled(Exception):
    """The stage run, or the flow run it belongs to, was cancelled."""


class RunWatch(Progress):
    """Raises `StageCancelled` from a progress event once the task run is final or cancelling (set so by
    someone else: it is Running while it runs) or its flow run is cancelling or cancelled."""

    def __init__(self):
        context = TaskRunContext.get()
        self.task_run_id = context.task_run.id if context else None
        self.flow_run_id = context.task_run.flow_run_id if context else None
        self.next_check = 0.0

    def stage_started(self, stage, total_items):
        self._advanced()

    def step(self, stage, step_index, total_steps):
        self._advanced()

    def item_done(self, stage, uri):
        self._advanced()

    def _advanced(self) -> None:
        progress_made()
        if self.task_run_id is None or time.monotonic() < self.next_check:
            return
        self.next_check = time.monotonic() + CHECK_SECONDS
        if reason := self.reason_to_stop():
            raise StageCancelled(reason)

    def reason_to_stop(self) -> str | None:
        try:
            with get_client(sync_client=True) as client:
                state = client.read_task_run(self.task_run_id).state
                if state is not None and (state.is_final() or state.is_cancelling()):
                    return f"the stage run is {state.name}"
                if self.flow_run_id is not None:
                    flow_state = client.read_flow_run(self.flow_run_id).state
                    if flow_state is not None and (flow_state.is_cancelling() or flow_state.is_cancelled()):
                        return f"its flow run is {flow_state.name}"
        except Exception:  # the server is away for a moment: go on, and look again next time
            return None
        return None
