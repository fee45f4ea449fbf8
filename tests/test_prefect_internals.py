"""What the warm stage workers use of Prefect beyond its public API (`tasks.prefect_internals`), checked
against the installed Prefect and the real server: a Prefect upgrade that changes any of it fails here."""

from __future__ import annotations

import asyncio
import inspect

import pytest
from prefect import task
from prefect.task_worker import TaskWorker

from tasks.prefect_internals import Deliveries, execute, worker_id


@task(name="stagediff-delivery-probe")
def delivery_probe(value: int) -> int:
    """A task no worker serves: its runs wait in the server's queue for the test's subscription."""
    return value


def test_task_worker_has_what_the_stage_workers_call():
    async def identity() -> str:
        return worker_id(TaskWorker(delivery_probe, limit=1))

    assert isinstance(asyncio.run(identity()), str) and asyncio.run(identity())
    assert inspect.iscoroutinefunction(TaskWorker.execute_task_run)
    assert list(inspect.signature(TaskWorker.execute_task_run).parameters) == ["self", "task_run"]
    assert inspect.iscoroutinefunction(execute)


def test_a_run_not_acknowledged_comes_back_when_the_connection_drops_and_not_once_acknowledged(prefect_client,
                                                                                              prefect_stack):
    future = delivery_probe.apply_async(kwargs={"value": 1})

    async def deliveries_seen() -> list:
        deliveries = Deliveries([delivery_probe.task_key], "stagediff-internals-test", prefect_stack.api_url)
        first = await asyncio.wait_for(deliveries.__anext__(), 30)
        await deliveries.drop_connection()  # as a worker killed before its run finished
        again = await asyncio.wait_for(deliveries.__anext__(), 30)
        await deliveries.acknowledge()
        await deliveries.drop_connection()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(deliveries.__anext__(), 5)
        await deliveries.drop_connection()
        return [first.id, again.id]

    assert asyncio.run(deliveries_seen()) == [future.task_run_id] * 2
