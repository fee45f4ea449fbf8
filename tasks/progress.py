"""Stage progress as a Prefect progress artifact: items done / total and the current denoise step."""

from __future__ import annotations

import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from stagediff.progress import Progress

MIN_UPDATE_SECONDS = 0.5


class ArtifactProgress(Progress):
    """Publishes a stage's progress on its task run, at most every half second per step update."""

    def __init__(self):
        self.artifact_id = None
        self.total = self.done = 0
        self.last_update = 0.0

    def stage_started(self, stage, total_items):
        self.total, self.done = total_items, 0
        self.artifact_id = create_progress_artifact(0.0, description=f"{stage}: 0/{total_items} items")

    def step(self, stage, step_index, total_steps):
        now = time.monotonic()
        if now - self.last_update >= MIN_UPDATE_SECONDS or step_index + 1 == total_steps:
            fraction = (self.done + (step_index + 1) / total_steps) / self.total
            self._update(fraction, f"{stage}: {self.done}/{self.total} items, step {step_index + 1}/{total_steps}")

    def item_done(self, stage, uri):
        self.done += 1
        self._update(self.done / self.total, f"{stage}: {self.done}/{self.total} items")

    def _update(self, fraction: float, description: str) -> None:
        self.last_update = time.monotonic()
        update_progress_artifact(self.artifact_id, min(100.0, 100.0 * fraction), description=description)
