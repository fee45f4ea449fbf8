"""The parts of Prefect's task-worker machinery that stagediff's warm stage workers use beyond
Prefect's public API, kept here and nowhere else (tests/test_prefect_internals.py fails when a Prefect
upgrade changes them):

- the server's subscription of scheduled task runs (`/task_runs/subscriptions/scheduled`, through
  `prefect.client.subscriptions.Subscription`), acknowledged with `{"type": "ack"}` once a run has
  finished instead of on arrival: until then the server holds the run and gives it to the next worker
  if the connection drops;
- `TaskWorker.execute_task_run`, which runs one delivered run with Prefect's own task engine;
- `TaskWorker.client_id`, the id the server knows a worker by.
"""

from __future__ import annotations

import asyncio
import json

from prefect.client.schemas.objects import TaskRun
from prefect.client.subscriptions import Subscription
from prefect.logging import get_logger
from prefect.task_worker import TaskWorker
from websockets.exceptions import ConnectionClosed

SCHEDULED_RUNS_PATH = "/task_runs/subscriptions/scheduled"
ACK = {"type": "ack"}
RECONNECT_SECONDS = 1.0

logger = get_logger("stagediff.worker")


class Deliveries(Subscription[TaskRun]):
    """The server's scheduled runs of some task keys, one at a time; the server tries the keys in the
    order given. A run is acknowledged by `acknowledge()`, not on arrival."""

    def __init__(self, task_keys: list[str], client_id: str, api_url: str):
        super().__init__(TaskRun, SCHEDULED_RUNS_PATH, task_keys, client_id=client_id, base_url=api_url)

    async def __anext__(self) -> TaskRun:
        while True:
            try:
                await self._ensure_connected()
                return TaskRun.model_validate_json(await self.websocket.recv())
            except (OSError, ConnectionClosed) as error:  # the server is restarting or unreachable
                logger.warning("No connection to the server (%s); connecting again", error)
                await self.drop_connection()
                await asyncio.sleep(RECONNECT_SECONDS)

    async def acknowledge(self) -> None:
        """Tell the server that the run it delivered last has finished."""
        try:
            await self.websocket.send(json.dumps(ACK))
        except ConnectionClosed:
            # The server put the run back in its queue when the connection dropped: whoever runs it
            # again finds its artifacts in the store.
            await self.drop_connection()

    @property
    def connected(self) -> bool:
        return self._websocket is not None

    async def drop_connection(self) -> None:
        if self._websocket is not None:
            websocket, self._websocket = self._websocket, None
            await websocket.close()


def worker_id(worker: TaskWorker) -> str:
    """The id the server knows a task worker by (its subscriptions and `/task_workers/filter` name it)."""
    return worker.client_id


async def execute(worker: TaskWorker, task_run: TaskRun) -> None:
    """Run one delivered task run with Prefect's task engine, as the worker's own loop would."""
    await worker.execute_task_run(task_run)
