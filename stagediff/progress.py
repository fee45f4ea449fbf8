"""Progress reporting for the stages: tqdm bars on a terminal, or any other sink (Prefect artifacts)."""

from __future__ import annotations

import sys


class Progress:
    """Receives stage progress; the base class ignores it."""

    def stage_started(self, stage: str, total_items: int) -> None:
        pass

    def step(self, stage: str, step_index: int, total_steps: int) -> None:
        pass

    def item_done(self, stage: str, uri: str) -> None:
        pass

    def stage_finished(self, stage: str) -> None:
        pass

    def close(self) -> None:
        """The batch has ended."""


class TqdmProgress(Progress):
    """One bar per stage for the items of a whole batch (its stage runs add theirs as they start) and,
    while denoising, one for the steps of the current call."""

    def __init__(self, file=None):
        self.file = file or sys.stderr
        self.items: dict[str, object] = {}
        self.steps = None

    def stage_started(self, stage, total_items):
        from tqdm import tqdm

        bar = self.items.get(stage)
        if bar is None:
            self.items[stage] = tqdm(total=total_items, desc=f"{stage:8s}", unit="item", file=self.file, leave=True)
        else:
            bar.total += total_items
            bar.refresh()

    def step(self, stage, step_index, total_steps):
        from tqdm import tqdm

        if self.steps is None or self.steps.total != total_steps or step_index == 0:
            self._close_steps()
            self.steps = tqdm(total=total_steps, desc="  steps", unit="step", file=self.file, leave=False)
        self.steps.update(1)

    def item_done(self, stage, uri):
        if stage in self.items:
            self.items[stage].update(1)

    def stage_finished(self, stage):
        self._close_steps()

    def close(self):
        self._close_steps()
        for bar in self.items.values():
            bar.close()
        self.items.clear()

    def _close_steps(self):
        if self.steps is not None:
            self.steps.close()
            self.steps = None


class ProgressGroup(Progress):
    """Forwards every event to several sinks (say, a terminal bar and a Prefect artifact)."""

    def __init__(self, *sinks: Progress):
        self.sinks = sinks

    def stage_started(self, stage, total_items):
        for sink in self.sinks:
            sink.stage_started(stage, total_items)

    def step(self, stage, step_index, total_steps):
        for sink in self.sinks:
            sink.step(stage, step_index, total_steps)

    def item_done(self, stage, uri):
        for sink in self.sinks:
            sink.item_done(stage, uri)

    def stage_finished(self, stage):
        for sink in self.sinks:
            sink.stage_finished(stage)

    def close(self):
        for sink in self.sinks:
            sink.close()
