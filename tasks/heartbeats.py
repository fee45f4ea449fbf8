"""Stage workers' heartbeats: Prefect events every few seconds naming the run a worker works on, or
how long it has been idle. Workers use them to tell a run given back by the server (a dropped
connection) that another worker is still running, and flows to find runs that were lost."""

from __future__ import annotations

import asyncio
import datetime
import os
import time
from dataclasses import dataclass, field

from prefect.events import emit_event
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

HEARTBEAT_EVENT = "stagediff.stage-worker.heartbeat"
HEARTBEAT_SECONDS = 5.0
EVENTS_PER_PAGE = 50
"""The most the server returns per page."""
STALL_SECONDS = float(os.environ.get("STAGEDIFF_STALL_SECONDS", "1800"))
"""A run whose stage has not advanced (no item, no denoise step, not started) for this long is stuck (a
hung read, a wedged device): the heartbeat stops naming it, and the flow that submitted it counts it
lost and submits it again. Long enough for loading and compiling a large model."""

_last_progress = time.monotonic()


def progress_made() -> None:
    """The stage running in this process advanced (called from its thread)."""
    global _last_progress
    _last_progress = time.monotonic()


class Heartbeat:
    """One worker's heartbeat: emits `HEARTBEAT_EVENT` every `HEARTBEAT_SECONDS` with the stages it
    serves, the run in progress (or none) and, while it can take runs, how long it has been idle."""

    def __init__(self, worker_id: str, stages: list[str], can_take_runs):
        self.worker_id = worker_id
        self.stages = stages
        self.can_take_runs = can_take_runs
        self.running: str | None = None
        self.idle_since = time.monotonic()

    def started(self, task_run_id) -> None:
        self.running = str(task_run_id)
        progress_made()
        self.beat()

    def finished(self) -> None:
        self.running = None
        self.idle_since = time.monotonic()

    def beat(self) -> None:
        idle = time.monotonic() - self.idle_since if self.can_take_runs() and not self.running else 0.0
        stuck = self.running is not None and time.monotonic() - _last_progress > STALL_SECONDS
        emit_event(
            HEARTBEAT_EVENT,
            resource={"prefect.resource.id": f"stagediff.stage-worker.{self.worker_id}",
                      "prefect.resource.name": self.worker_id},
            payload={"stages": self.stages, "running": None if stuck else self.running,
                     "idle_seconds": round(idle, 1), **({"stuck": self.running} if stuck else {})},
        )

    async def keep_beating(self) -> None:
        while True:
            self.beat()
            await asyncio.sleep(HEARTBEAT_SECONDS)


@dataclass
class IdleReport:
    when: datetime.datetime
    idle_seconds: float
    stages: list[str]


@dataclass
class Heartbeats:
    """What the stage workers reported over some recent seconds."""

    running: dict[str, list[tuple[datetime.datetime, str]]] = field(default_factory=dict)
    """Task run id -> (when, worker id) of each report naming it."""
    idle: list[IdleReport] = field(default_factory=list)

    def reported_running(self, task_run_id, after: datetime.datetime | None = None, by_other_than: str = "") -> bool:
        return any(worker != by_other_than and (after is None or when > after)
                   for when, worker in self.running.get(str(task_run_id), ()))


def read_heartbeats(client, seconds: float) -> Heartbeats:
    """The heartbeats of the last `seconds`, read with a sync Prefect client."""
    since = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=seconds)
    page = client.read_events(EventFilter(event=EventNameFilter(name=[HEARTBEAT_EVENT]),
                                          occurred=EventOccurredFilter(since=since)), limit=EVENTS_PER_PAGE)
    heartbeats = Heartbeats()
    while page:
        for event in page.events:
            if running := event.payload.get("running"):
                heartbeats.running.setdefault(running, []).append((event.occurred, event.resource.name))
            else:
                heartbeats.idle.append(IdleReport(event.occurred, event.payload["idle_seconds"], event.payload["stages"]))
        page = client.read_events_page(page.next_page) if page.next_page else None
    return heartbeats
