"""A long-lived stage worker: the warm way to run the stages. It keeps each stage's pipeline loaded
(and its torchax programs compiled) between stage runs and across batches.

    python -m tasks.worker --stages encode             # on CPU machines
    python -m tasks.worker --stages denoise,decode     # on each accelerator machine (one per accelerator)

It is a Prefect task worker serving the stage tasks, one run at a time, with one difference from
`prefect task serve`: it acknowledges a run to the server only once the run has finished. Until then
the server holds the run and, if the connection drops (the worker was killed, its machine went away:
the server pings every connection), gives it to the next free worker. Prefect's own task worker
acknowledges a run as it arrives and, with its slot busy, takes the next one too: a killed worker
loses both, and a busy worker holds runs that an idle one could start.

A dropped connection also gives back the run of a worker that is alive and still running it; the
worker given such a run leaves it alone when the other worker's heartbeat (`tasks.heartbeats`) names
it. The generate flow uses the heartbeats too, to find stage runs lost anyway (`flows.stage_workers`).
Stop a worker with SIGTERM or Ctrl-C: it exits at once, and the server gives its current run to
another worker, which redoes nothing the store already holds.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import signal

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import TaskRun
from prefect.exceptions import ObjectNotFound
from prefect.settings import get_current_settings
from prefect.states import Cancelled
from prefect.task_worker import TaskWorker

from stagediff.devices import log_stage_devices
from tasks.heartbeats import HEARTBEAT_SECONDS, Heartbeat, read_heartbeats
from tasks.prefect_internals import Deliveries, execute, logger, worker_id
from tasks.stage_tasks import STAGE_TASKS

REDELIVERY_WAIT_SECONDS = 3 * HEARTBEAT_SECONDS
"""How long a worker given a run that was started elsewhere waits for that worker's heartbeat."""


async def serve(stages: list[str]) -> None:
    """Run the given stages' task runs, one at a time, until the process is stopped."""
    api_url = get_current_settings().api.url
    if not api_url:
        raise SystemExit("stage workers need a Prefect server: set PREFECT_API_URL")
    # Later stages first: finishing items that have started beats starting new ones.
    served = [name for name in reversed(STAGE_TASKS) if name in stages]
    tasks = [STAGE_TASKS[name] for name in served]
    worker = TaskWorker(*tasks, limit=1)
    async with worker, get_client() as client:
        identity = worker_id(worker)
        deliveries = Deliveries([task.task_key for task in tasks], identity, api_url)
        heartbeat = Heartbeat(identity, served, can_take_runs=lambda: deliveries.connected)
        beating = asyncio.create_task(heartbeat.keep_beating())
        logger.info("Stage worker %s serving %s", identity, ", ".join(served))
        log_stage_devices(served, logger)
        try:
            async for task_run in deliveries:
                heartbeat.started(task_run.id)
                if reason := await _reason_to_skip(client, task_run, identity):
                    logger.info("Skipping %s (%s): %s", task_run.name, task_run.id, reason)
                else:
                    logger.info("Running %s (%s)", task_run.name, task_run.id)
                    await execute(worker, task_run)
                heartbeat.finished()
                await deliveries.acknowledge()
        finally:
            beating.cancel()


async def _reason_to_skip(client, task_run: TaskRun, worker_id: str) -> str | None:
    """Why not to run a delivered run, or None. The server delivers a run again when a connection
    drops; the worker that had it may be dead (run it) or alive, only cut off from the server (it
    goes on beating: leave the run to it). A run its flow gave up as lost is final already."""
    delivered = datetime.datetime.now(datetime.timezone.utc)
    try:
        state = (await client.read_task_run(task_run.id)).state
    except ObjectNotFound:  # the server can deliver a new run before the run's record is committed
        return None
    except Exception as error:  # doing a run twice costs time; dropping it would lose it
        logger.warning("Could not read the state of %s (%s): running it", task_run.name, error)
        return None
    if state is None or state.is_scheduled():
        return await _flow_run_cancelled(client, task_run)
    if state.is_final():
        return f"it is {state.name} already"
    await asyncio.sleep(REDELIVERY_WAIT_SECONDS)  # a live worker beats within this
    try:
        heartbeats = await asyncio.to_thread(_read_heartbeats, REDELIVERY_WAIT_SECONDS)
    except Exception as error:  # as above: a run done twice costs time, a run dropped is lost
        logger.warning("Could not read the stage workers' heartbeats for %s (%s): running it", task_run.name, error)
        return None
    if heartbeats.reported_running(task_run.id, after=delivered, by_other_than=worker_id):
        return "another worker reports it running"
    return None


async def _flow_run_cancelled(client, task_run: TaskRun) -> str | None:
    """A queued run whose flow run was cancelled (the UI's Cancel) is not started: it is set Cancelled."""
    if task_run.flow_run_id is None:
        return None
    try:
        flow_state = (await client.read_flow_run(task_run.flow_run_id)).state
        if flow_state is None or not (flow_state.is_cancelling() or flow_state.is_cancelled()):
            return None
        await client.set_task_run_state(task_run.id, Cancelled(message=f"its flow run is {flow_state.name}"),
                                        force=True)
    except Exception as error:  # as above: run it rather than drop it
        logger.warning("Could not read the flow run of %s (%s): running it", task_run.name, error)
        return None
    return f"its flow run is {flow_state.name}"


def _read_heartbeats(seconds: float):
    with get_client(sync_client=True) as client:
        return read_heartbeats(client, seconds)


def parse_stages(text: str) -> list[str]:
    stages = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in stages if name not in STAGE_TASKS]
    if unknown or not stages:
        raise argparse.ArgumentTypeError(f"{text!r}: stages are {', '.join(STAGE_TASKS)} (comma-separated)")
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description="A long-lived stage worker (models stay loaded between runs).")
    parser.add_argument("--stages", type=parse_stages, required=True,
                        help="comma-separated: encode on CPU machines, denoise,decode on accelerator machines")
    args = parser.parse_args()
    # Stop at once on either signal, even when started in the background with SIGINT ignored: the
    # server gives the current run to another worker.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)
    asyncio.run(serve(args.stages))


if __name__ == "__main__":
    main()
