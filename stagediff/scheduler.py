"""One scheduler for every way of running a batch: the CLI in this process, the generate flow on warm
stage workers, on stage deployments, or as tasks of its own run.

A plan becomes units of work (`schedule`): its pending items, in order of grid point, are cut into
chunks whose size comes from the number of accelerator workers and a cap, never from the number of
prompts, so a sweep of one prompt over 1000 seeds keeps every accelerator busy. Each chunk is a denoise
unit (its items without latents) and a decode unit; a chunk's prompts not yet encoded form an encode
unit that its denoise unit waits for; where the request names scorers, a score unit after its decode
unit (and one per chunk of items whose media exist but are not all scored). The `BatchRun` submits each unit to an executor as soon as the
units it waits for have finished and the executor has room for its stage, reports progress, and
finishes the run: the manifest and the contact sheet.

Executors differ only in where a unit runs and how many of each stage they take at once: in this
process (`LocalExecutor`: on a CPU alone one unit at a time, with an accelerator encode beside
denoise and decode), or through Prefect (`flows.executors`). Nothing here imports torch or Prefect.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from stagediff.contact_sheet import write_contact_sheet
from stagediff.errors import CorruptInput
from stagediff.inventory import DONE, Inventory, PlanState, plan_state
from stagediff.manifest import manifest_of, write_manifest
from stagediff.plan import DECODE, DENOISE, ENCODE, SCORE, Item, Plan
from stagediff.request import Request
from stagediff.run_records import declared_run, plan_paths

MAX_ITEMS_PER_UNIT = 32
"""A unit's items at most: its progress, and what a lost run takes back to the queue."""
UNITS_PER_ACCELERATOR = 2
"""Denoise units per accelerator worker: one computing while the next is queued (each unit costs a
dispatch: measured on the 2-core VM, 24 items on one warm worker took 21.7-22.8 s in 6 units of 4 items
and 15.1-15.4 s in 2 of 12)."""
CORRUPT_INPUT_ATTEMPTS = 2
"""Schedules a run makes when a stage finds an input corrupt: the second one has its producer rewrite it."""
WAIT_SECONDS = 0.5
"""How long the run waits for a unit to finish before it lets the executor look after its runs."""


@dataclass(frozen=True)
class Unit:
    """One stage run: a stage over some artifacts of the batch (by key), after the units it waits for."""

    index: int
    stage: str
    keys: tuple[str, ...]
    """Embeddings keys (encode) or latents keys (denoise, decode, score)."""
    prompts: tuple[str | dict, ...]
    """The request's prompt entries its artifacts come from."""
    seeds: tuple[int, ...]
    after: tuple[int, ...] = ()
    """Indices of the units it waits for."""
    items: int = 0
    """Items the unit finishes (decode units): the run's progress."""

    def request(self, batch: Request) -> Request:
        """The batch's request narrowed to this unit's prompts and seeds (its keys select among them)."""
        return batch.replace(prompts=self.prompts, seeds=self.seeds)

    def parameters(self, batch: dict) -> dict:
        """The batch's option parameters narrowed the same way, with the unit's keys."""
        return {**batch, "prompts": list(self.prompts), "prompt_file": None, "seeds": list(self.seeds),
                "keys": list(self.keys)}


def unit_items(items: int, accelerators: int) -> int:
    """Items per denoise/decode unit: `UNITS_PER_ACCELERATOR` units for each accelerator worker, at most
    `MAX_ITEMS_PER_UNIT` items each."""
    units = UNITS_PER_ACCELERATOR * max(1, accelerators)
    return max(1, min(MAX_ITEMS_PER_UNIT, math.ceil(items / units)))


def schedule(plan: Plan, state: PlanState, accelerators: int, size: int | None = None,
             scored: set[str] | None = None) -> list[Unit]:
    """The units that finish the batch: what the store (`state`, and `scored`: the score files it holds,
    listed here when not given) lacks, nothing else; `size` items per denoise and decode unit (default
    `unit_items`)."""
    points = {point: index for index, point in enumerate(plan.points)}
    pending = [item for item in plan.items if state.media[item.media_path] != DONE]
    pending.sort(key=lambda item: points[item.point])  # one pipeline load per grid point, not per item
    size = size or unit_items(len(pending), accelerators)
    units: list[Unit] = []
    encoded: dict[str, int | None] = {}
    """Embedding key → the encode unit that writes it (None: none needed)."""
    for first in range(0, len(pending), size):
        chunk = pending[first: first + size]
        to_denoise = [item for item in chunk if state.latents[item.latents_path] != DONE]
        denoise_unit = None
        if to_denoise:
            # Embeddings of items to denoise go through encode, which verifies them in full.
            new = [item.embedding for item in to_denoise if item.embedding.key not in encoded]
            embeddings = list({embedding.key: embedding for embedding in new}.values())
            if embeddings:
                encode_unit = len(units)
                units.append(Unit(encode_unit, ENCODE, tuple(e.key for e in embeddings),
                                  _entries(e.entry for e in embeddings), (plan.request.seeds[0],)))
                encoded.update(dict.fromkeys((e.key for e in embeddings), encode_unit))
            after = tuple(sorted({encoded[item.embedding.key] for item in to_denoise}))
            denoise_unit = len(units)
            units.append(_item_unit(denoise_unit, DENOISE, to_denoise, after))
        units.append(_item_unit(len(units), DECODE, chunk, (denoise_unit,) if denoise_unit is not None else (),
                                finishes=len(chunk)))
        if plan.request.scores:
            units.append(_item_unit(len(units), SCORE, chunk, (len(units) - 1,)))
    if plan.request.scores:
        units += _score_units(plan, state, len(units), accelerators, scored)
    return units


def _score_units(plan: Plan, state: PlanState, first_index: int, accelerators: int, scored: set[str] | None) -> list[Unit]:
    """Score units for items whose media the store holds but whose scores it lacks (a scorer added to a
    finished run), in chunks like the others."""
    from stagediff.scoring import score_tasks, stored_scores

    scored = stored_scores(plan) if scored is None else scored
    unscored = {id(task.item) for task in score_tasks(plan) if task.path not in scored}
    items = [item for item in plan.items if id(item) in unscored and state.media[item.media_path] == DONE]
    size = unit_items(len(items), accelerators)
    return [_item_unit(first_index + number, SCORE, items[first: first + size], ())
            for number, first in enumerate(range(0, len(items), size))]


def _item_unit(index: int, stage: str, items: list[Item], after: tuple[int, ...], finishes: int = 0) -> Unit:
    return Unit(index, stage, tuple(item.latents_key for item in items), _entries(i.embedding.entry for i in items),
                tuple(dict.fromkeys(item.seed for item in items)), after, finishes)


def _entries(entries) -> tuple:
    distinct: dict[str, str | dict] = {}
    for entry in entries:
        distinct.setdefault(repr(entry), entry)
    return tuple(distinct.values())


class Executor(ABC):
    """Where units run. It takes at most `slots(stage)` units at once of the stages that share a `lane`."""

    accelerators: int = 1
    """Accelerator workers it spreads denoise units over."""

    def lane(self, stage: str) -> str:
        return stage

    @abstractmethod
    def slots(self, stage: str) -> int:
        """Units of this stage's lane it takes at once."""

    @abstractmethod
    def submit(self, unit: Unit, after: list) -> object:
        """Start a unit (its dependencies have finished; `after` are their handles); return its handle."""

    @abstractmethod
    def wait(self, handles: list, timeout: float) -> list:
        """The handles that have finished, waiting up to `timeout` seconds for one."""

    @abstractmethod
    def outcome(self, handle) -> None:
        """Raise the failure of a finished unit, if it failed."""

    def close(self) -> None:
        """Release what the executor holds (threads, clients)."""


class BatchRun:
    """Runs a plan's units on an executor, then writes the run's manifest and contact sheet."""

    def __init__(self, plan: Plan, executor: Executor, run_name: str, manifest_copy: str | None = None,
                 on_progress: Callable[[int, int], None] | None = None, log: Callable[[str], None] | None = None,
                 unit_items: int | None = None):
        self.plan, self.executor = plan, executor
        self.run_name, self.manifest_copy = run_name, manifest_copy
        self.unit_items = unit_items
        self.on_progress = on_progress or (lambda done, total: None)
        self.log = log or (lambda message: None)

    def run(self) -> str:
        """Run every unit the batch still needs; return the manifest's URI. The run declares its
        artifacts (its run record) before it looks at the store, and keeps the record fresh until
        its manifest is written."""
        with declared_run(self.plan.store, self.run_name, plan_paths(self.plan)) as self._record:
            try:
                for attempt in range(CORRUPT_INPUT_ATTEMPTS):
                    try:
                        self._run_units()
                        break
                    except Exception as error:
                        # A stage found an input corrupt and noted it in the store (here, or on a
                        # worker whose failure reaches us as another error): the new schedule has its
                        # producer write it again.
                        if attempt + 1 == CORRUPT_INPUT_ATTEMPTS or not (
                                isinstance(error, CorruptInput) or self._noted_corrupt()):
                            raise
                        self.log(f"{error}; scheduling its producing stage again")
            finally:
                self.executor.close()
            manifest_uri = write_manifest(self.plan, self.run_name, self.manifest_copy)
            write_contact_sheet(self.plan.store, self.run_name, manifest_of(self.plan))
        return manifest_uri

    def _noted_corrupt(self) -> list[str]:
        inputs = [e.path for e in self.plan.embeddings] + [item.latents_path for item in self.plan.items]
        return Inventory(self.plan.store).noted_corrupt(inputs)

    def _run_units(self) -> None:
        state = plan_state(self.plan)
        units = schedule(self.plan, state, self.executor.accelerators, self.unit_items)
        done, total = state.done_items, len(self.plan.items)
        self.on_progress(done, total)
        if units:
            counts = {stage: sum(unit.stage == stage for unit in units) for stage in (ENCODE, DENOISE, DECODE, SCORE)}
            self.log(f"{total - done} of {total} items to make: " +
                     ", ".join(f"{count} {stage} runs" for stage, count in counts.items() if count))
            for unit in self._execute(units):
                self._record.wrote_nothing = False
                done += unit.items
                self.on_progress(done, total)

    def _execute(self, units: list[Unit]):
        """Submit units as they become ready and room allows; yield each as it finishes."""
        executor = self.executor
        waiting = list(units)
        running: dict[object, Unit] = {}
        finished: dict[int, object] = {}
        while waiting or running:
            busy: dict[str, int] = {}
            for unit in running.values():
                busy[executor.lane(unit.stage)] = busy.get(executor.lane(unit.stage), 0) + 1
            for unit in list(waiting):
                lane = executor.lane(unit.stage)
                if all(index in finished for index in unit.after) and busy.get(lane, 0) < executor.slots(unit.stage):
                    waiting.remove(unit)
                    running[executor.submit(unit, [finished[index] for index in unit.after])] = unit
                    busy[lane] = busy.get(lane, 0) + 1
            for handle in executor.wait(list(running), WAIT_SECONDS):
                unit = running.pop(handle)
                executor.outcome(handle)
                finished[unit.index] = handle
                yield unit


CPU_STAGES = (ENCODE, SCORE)
"""Stages that run on the CPU whatever the backend: text encoders and scorers."""


def local_lane(stage: str, overlap: bool) -> str:
    """The lane of a stage run in this process: one for all, or with `overlap` the CPU's beside the
    accelerator's."""
    if not overlap:
        return "this process"
    return "cpu" if stage in CPU_STAGES else "accelerator"


class LocalExecutor(Executor):
    """Runs units in this process with `run_unit(unit)`: one at a time, or with `overlap` encode and
    score in one thread beside denoise and decode in another."""

    def __init__(self, run_unit: Callable[[Unit], object], overlap: bool):
        self.run_unit, self.overlap = run_unit, overlap
        self.threads = ThreadPoolExecutor(max_workers=2 if overlap else 1, thread_name_prefix="stagediff")

    def lane(self, stage):
        return local_lane(stage, self.overlap)

    def slots(self, stage):
        return 1

    def submit(self, unit, after) -> Future:
        return self.threads.submit(self.run_unit, unit)

    def wait(self, handles, timeout):
        return list(wait(handles, timeout=timeout, return_when=FIRST_COMPLETED).done)

    def outcome(self, handle):
        handle.result()

    def close(self):
        self.threads.shutdown(wait=True, cancel_futures=True)
