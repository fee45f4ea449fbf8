"""Stage progress as a Prefect progress artifact: items done / total and the current denoise step."""

from __future__ import annotations

import contextvars
import threading
import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging import get_logger

from stagediff.progress import Progress

MIN_UPDATE_SECONDS = 0.5

logger = get_logger("stagediff.progress")


class ArtifactProgress(Progress):
    """Publishes a stage's progress on its task run, at most every half second per step update.

    The artifact is created and updated from a background thread, so neither a stage's start nor a
    denoise step waits for the server (a busy server would otherwise stall the accelerator); an update
    made while another is in flight replaces the one waiting, and the stage's last update is published
    before it ends.
    """

    def __init__(self):
        self.artifact_id = None
        self.total = self.done = 0
        self.last_update = 0.0
        self._lock = threading.Lock()
        self._waiting: tuple[float, str] | None = None
        self._publisher: threading.Thread | None = None

    def stage_started(self, stage, total_items):
        self.total, self.done = total_items, 0
        self._update(0.0, f"{stage}: 0/{total_items} items")

    def step(self, stage, step_index, total_steps):
        now = time.monotonic()
        if now - self.last_update >= MIN_UPDATE_SECONDS or step_index + 1 == total_steps:
            fraction = (self.done + (step_index + 1) / total_steps) / self.total
            self._update(fraction, f"{stage}: {self.done}/{self.total} items, step {step_index + 1}/{total_steps}")

    def item_done(self, stage, uri):
        self.done += 1
        self._update(self.done / self.total, f"{stage}: {self.done}/{self.total} items")

    def stage_finished(self, stage):
        publisher = self._publisher
        if publisher is not None:
            publisher.join()

    def _update(self, fraction: float, description: str) -> None:
        self.last_update = time.monotonic()
        with self._lock:
            self._waiting = (min(100.0, 100.0 * fraction), description)
            if self._publisher is None:
                # The thread sees this run's context (its API and client settings).
                self._publisher = threading.Thread(target=contextvars.copy_context().run, args=(self._publish,),
                                                   daemon=True)
                self._publisher.start()

    def _publish(self) -> None:
        """Publish the waiting update until none is left, then end (a failed stage leaves no thread)."""
        while True:
            with self._lock:
                update, self._waiting = self._waiting, None
                if update is None:
                    self._publisher = None
                    return
            try:
                if self.artifact_id is None:
                    self.artifact_id = create_progress_artifact(update[0], description=update[1])
                else:
                    update_progress_artifact(self.artifact_id, update[0], description=update[1])
            except Exception as error:  # progress is for people watching: never fail the stage over it
                logger.warning("Could not update the progress artifact: %s", error)
