"""Looking after a store: `verify` reads every artifact (score files included) in full, several at once,
and can remove the corrupt ones so that they are recomputed; `gc` finds what killed writers left and,
when asked, the artifacts that no run declares (manifests, and the records of live or recently died
runs: see `stagediff.run_records`). Nothing is deleted unless asked, and each file is checked again
right before it is deleted; I/O errors are reported, never taken for corruption."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from stagediff.errors import CorruptArtifact, one_line
from stagediff.media import CorruptMedia, verified_media_metadata
from stagediff.run_records import RUNS_FOLDER, DeclarationReader
from stagediff.scoring import SCORES_FOLDER, check_score_file
from stagediff.store import CORRUPT_MARKER_SUFFIX, LEFTOVER_AGE_SECONDS, Store

TENSOR_FOLDERS = ("embeddings", "latents")
MEDIA_FOLDER = "media"
STORE_ARTIFACT_FOLDERS = (*TENSOR_FOLDERS, MEDIA_FOLDER, SCORES_FOLDER)
"""The folders of a store whose files are artifacts (runs/ holds their declarations)."""
VERIFY_THREADS = 8

logger = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    checked: int = 0
    corrupt: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    """Artifacts whose reading failed (I/O): not judged, never removed."""
    removed: list[str] = field(default_factory=list)


@dataclass
class GcReport:
    leftovers: list[str] = field(default_factory=list)
    unreferenced: list[str] = field(default_factory=list)
    deleted: bool = False
    kept: list[str] = field(default_factory=list)
    """Found unreferenced, but declared or written again by the time of their delete."""


def artifact_paths(store: Store) -> list[str]:
    """Every artifact of the store (relative paths; score files included), from listings."""
    paths = [path for folder in TENSOR_FOLDERS for path in store.walk(folder) if path.endswith(".safetensors")]
    paths += [path for path in store.walk(MEDIA_FOLDER) if path.endswith((".png", ".mp4"))]
    paths += [path for path in store.walk(SCORES_FOLDER) if path.endswith(".json")]
    return sorted(paths)


def verify(store: Store, repair: bool = False, on_checked: Callable[[str], None] | None = None) -> VerifyReport:
    """Read every artifact in full: tensors against their key (the file name) and checksum, media by
    decoding every pixel and frame. With `repair`, remove the corrupt ones (the next run recomputes them)."""
    report = VerifyReport()
    paths = artifact_paths(store)
    with ThreadPoolExecutor(max_workers=VERIFY_THREADS) as pool:
        for path, problem in zip(paths, pool.map(lambda path: _check(store, path), paths)):
            report.checked += 1
            if problem == "corrupt":
                report.corrupt.append(path)
            elif problem:
                report.unreadable.append(f"{path}: {problem}")
            if on_checked:
                on_checked(path)
    if repair:
        for path in report.corrupt:
            # Checked again right before: a stage may have written it again since it was read.
            if _check(store, path) == "corrupt":
                store.remove(path)
                report.removed.append(path)
    return report


def _check(store: Store, path: str) -> str | None:
    """None when the artifact is whole, "corrupt", or the I/O error that kept it from being read."""
    name = path.rsplit("/", 1)[-1]
    try:
        if path.endswith(".safetensors"):
            store.read_artifact(path, name.removesuffix(".safetensors"))
        elif path.endswith(".json"):
            check_score_file(store.read_bytes(path), name.removesuffix(".json"))
        else:
            verified_media_metadata(name.rsplit(".", 1)[-1], store.read_bytes(path))
    except (CorruptArtifact, CorruptMedia):
        return "corrupt"
    except OSError as error:
        return one_line(error)
    return None


def garbage(store: Store, unreferenced: bool = False, older_than: float = LEFTOVER_AGE_SECONDS) -> GcReport:
    """What `gc` would delete: leftovers of killed writers, and (with `unreferenced`) artifacts that no
    manifest and no fresh run record under runs/ declares (`stagediff.run_records`), both only once
    `older_than` seconds old."""
    folders = (*STORE_ARTIFACT_FOLDERS, RUNS_FOLDER)
    report = GcReport(leftovers=sorted({path for folder in folders for path in store.leftovers(folder, older_than)}))
    if unreferenced:
        protected = DeclarationReader(store).read().protected
        now = time.time()
        listed = {path: info for folder in STORE_ARTIFACT_FOLDERS for path, info in store.walk(folder).items()}
        report.unreferenced = sorted(
            path for path, info in listed.items()
            if _declared(path) not in protected and (info.modified is None or now - info.modified >= older_than)
        )
    return report


def collect(store: Store, report: GcReport, older_than: float = LEFTOVER_AGE_SECONDS) -> GcReport:
    """Delete what `garbage` found, checking each artifact again right before deleting it: kept when a
    run has declared it since (manifests and run records read again), or when it was written again
    (younger than `older_than`, or another version than listed). What was kept is in `report.kept`."""
    for path in report.leftovers:
        try:
            os.remove(path)
        except FileNotFoundError:
            continue
        except OSError as error:  # another user's file: theirs to clean
            logger.warning("cannot remove leftover %s: %s", path, one_line(error))
    declarations = DeclarationReader(store)
    deleted = []
    for path in report.unreferenced:
        if _declared(path) in declarations.read().protected:
            report.kept.append(path)
            continue
        folder, name = path.rsplit("/", 1)
        info = store.list_folder(folder).get(name)
        if info is None:
            continue
        if info.modified is not None and time.time() - info.modified < older_than:
            report.kept.append(path)
            continue
        store.remove(path)
        deleted.append(path)
    report.unreferenced = deleted
    report.deleted = True
    return report


def _declared(path: str) -> str:
    """The artifact a file belongs to (a corruption note `<artifact>.corrupt` goes with its artifact)."""
    return path.removesuffix(CORRUPT_MARKER_SUFFIX)
