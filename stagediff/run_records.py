"""Run records: a run declares what it uses before it uses it, so that `gc` never deletes live work.

A run writes `runs/<run-name>/record.json` at its start, before it looks at the store: every artifact
path its plan names (embeddings, latents, media, score files), when it started, and a heartbeat that a thread
refreshes every `HEARTBEAT_SECONDS` while it runs. At its end the run writes its manifest (which
protects its artifacts for good) and a last record marked `ended`.

`gc` keeps every artifact that a manifest names, and every artifact a record declares while that
record is fresh: its last heartbeat is younger than `RECORD_PROTECTS_SECONDS` (7 days). A run that
died (record, no manifest) therefore keeps its work for a week after its last heartbeat, long enough
to be resumed under the same name; after that its record no longer protects anything. A record that
cannot be read stops `gc` (it never guesses). `gc` reads the declarations again right before each
delete (restic's prune with its locks is the model); a run that declares in the instant between that
check and the delete is the one race left, as with restic.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from stagediff.confinement import check_run_name
from stagediff.errors import CorruptArtifact, StagediffError, one_line
from stagediff.manifest import item_paths
from stagediff.scoring import score_tasks

RUNS_FOLDER = "runs"
RECORD_NAME = "record.json"
MANIFEST_NAME = "manifest.json"
HEARTBEAT_SECONDS = 60.0
RECORD_PROTECTS_SECONDS = 7 * 24 * 3600.0
"""How long after its last heartbeat a run record keeps what it declares (a manifest keeps it for good)."""

logger = logging.getLogger(__name__)


def record_path(run_name: str) -> str:
    return f"{RUNS_FOLDER}/{run_name}/{RECORD_NAME}"


def plan_paths(plan) -> list[str]:
    """Every artifact path a plan names (score files included), in order, once each."""
    paths = [embedding.path for embedding in plan.embeddings]
    for item in plan.items:
        paths += [item.latents_path, item.media_path]
    if plan.request.scores:
        paths += [task.path for task in score_tasks(plan)]
    return list(dict.fromkeys(paths))


class RunRecord:
    """The record of one run: written by `start`, refreshed by a heartbeat thread, closed by `end`."""

    def __init__(self, store, run_name: str, paths: Iterable[str], heartbeat_seconds: float = HEARTBEAT_SECONDS):
        check_run_name(run_name)
        self.store, self.run_name = store, run_name
        self.paths = list(paths)
        self.heartbeat_seconds = heartbeat_seconds
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.wrote_nothing = True
        """Cleared by the run once any of its work may have been written (see `declared_run`)."""

    def _write(self, ended: bool = False) -> None:
        now = time.time()
        document = {"run": self.run_name, "host": socket.gethostname(), "pid": os.getpid(),
                    "started": self.started, "heartbeat": now, "ended": now if ended else None,
                    "paths": self.paths}
        self.store.write_json(record_path(self.run_name), document)

    def start(self) -> RunRecord:
        """Declare the paths (before anything else touches the store), then keep the record fresh."""
        self._write()
        self._thread = threading.Thread(target=self._beat, name=f"stagediff-record-{self.run_name}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                self._write()
            except Exception as error:  # a missed beat is retried at the next one; the run goes on
                logger.warning("run %s: refreshing its record failed: %s", self.run_name, one_line(error))

    def discard(self) -> None:
        """Stop the heartbeat and remove the record (the run used nothing)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(FileNotFoundError):
            self.store.remove(record_path(self.run_name))

    def end(self) -> None:
        """Stop the heartbeat and mark the record ended (it still protects until it is stale)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self._write(ended=True)
        except Exception as error:
            logger.warning("run %s: closing its record failed: %s", self.run_name, one_line(error))


@contextlib.contextmanager
def declared_run(store, run_name: str, paths: Iterable[str],
                 heartbeat_seconds: float = HEARTBEAT_SECONDS) -> Iterator[RunRecord]:
    """A run record for the duration of the block. A run that fails on bad input (a one-line
    `StagediffError`, not a corrupt artifact) while `record.wrote_nothing` still holds leaves no record:
    bad input leaves nothing behind."""
    record = RunRecord(store, run_name, paths, heartbeat_seconds).start()
    try:
        yield record
    except StagediffError as error:
        if record.wrote_nothing and not isinstance(error, CorruptArtifact):
            record.discard()
            raise
        record.end()
        raise
    except BaseException:
        record.end()
        raise
    record.end()


@dataclass
class Declarations:
    """What the runs of a store declare, read from `runs/`."""

    protected: set[str] = field(default_factory=set)
    """Artifact paths that manifests and fresh records name."""
    live_runs: list[str] = field(default_factory=list)
    """Runs with a fresh record and no manifest (running, or died within `RECORD_PROTECTS_SECONDS`)."""


class DeclarationReader:
    """Reads the declarations of a store's runs, again whenever asked, reading only the files whose
    listing changed since the last time."""

    def __init__(self, store, now=time.time):
        self.store, self.now = store, now
        self._read: dict[str, tuple[tuple, dict]] = {}

    def read(self) -> Declarations:
        declarations = Declarations()
        listed = self.store.walk(RUNS_FOLDER)
        manifests = {path.rsplit("/", 1)[0] for path in listed if path.endswith("/" + MANIFEST_NAME)}
        for path, info in sorted(listed.items()):
            name = path.rsplit("/", 1)[-1]
            if name not in (MANIFEST_NAME, RECORD_NAME):
                continue
            document = self._document(path, (info.size, info.modified, info.version))
            if name == MANIFEST_NAME:
                for item in document.get("items", ()):
                    declarations.protected |= item_paths(item)
                continue
            heartbeat = document.get("heartbeat") or 0
            if self.now() - heartbeat < RECORD_PROTECTS_SECONDS:
                declarations.protected |= set(document.get("paths", ()))
                if path.rsplit("/", 1)[0] not in manifests:
                    declarations.live_runs.append(document.get("run", path))
        return declarations

    def _document(self, path: str, version: tuple) -> dict:
        known = self._read.get(path)
        if known is not None and known[0] == version and version[2] is not None:
            return known[1]
        try:
            document = json.loads(self.store.read_bytes(path))
            if not isinstance(document, dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            raise StagediffError(f"cannot read {self.store.uri_of(path)} ({one_line(error)}): refusing to delete "
                                 "anything while a run's declarations are unknown") from None
        self._read[path] = (version, document)
        return document
