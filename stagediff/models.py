"""Model checkpoints: where a `--model` lives, which family it is, and a fingerprint of its components."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from stagediff.errors import StagediffError
from stagediff.families import FamilyAdapter, family_for_pipeline

WHOLE_FILE_HASH_LIMIT = 4 * 2**20
EDGE_BYTES = 2**20


@dataclass(frozen=True)
class Model:
    """A diffusers checkpoint folder on local disk, with its family."""

    reference: str
    """What the user passed to --model (Hugging Face id, folder or gs:// URI)."""
    folder: Path
    family: FamilyAdapter
    model_index: dict

    def config_of(self, component: str) -> dict:
        """The JSON config of one component (`unet`, `vae`, `scheduler`, ...)."""
        return _read_component_config(self.folder, component)

    def components(self) -> tuple[str, ...]:
        """Names of all pipeline components listed in model_index.json."""
        return tuple(name for name, value in self.model_index.items() if not name.startswith("_") and isinstance(value, list))

    def fingerprint(self, components: tuple[str, ...]) -> str:
        """A content fingerprint of the named components' files (changes when any of them changes)."""
        return _fingerprint(self.folder, tuple(sorted(components)))


def open_model(reference: str) -> Model:
    """Resolve `--model` to a local diffusers folder and detect its family."""
    folder = resolve_model_folder(reference)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise StagediffError(f"not a diffusers model folder (no model_index.json): {reference}")
    try:
        model_index = json.loads(index_path.read_text())
    except json.JSONDecodeError as error:
        raise StagediffError(f"unreadable model_index.json in {reference}: {error}") from None
    family = family_for_pipeline(str(model_index.get("_class_name")), f"{reference}/model_index.json")
    return Model(reference=reference, folder=folder, family=family, model_index=model_index)


def resolve_model_folder(reference: str) -> Path:
    """A local folder for `reference`: itself when it is a folder, else a Hugging Face hub snapshot."""
    if reference.startswith("gs://"):
        from stagediff.gcs import mirror_folder

        return mirror_folder(reference).folder
    path = Path(reference).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise StagediffError(f"--model {reference} is a file, not a diffusers model folder")
    if not _looks_like_hub_id(reference):
        raise StagediffError(f"model not found: {reference} (no such folder)")
    return _download_from_hub(reference)


def _looks_like_hub_id(reference: str) -> bool:
    parts = reference.split("/")
    return len(parts) == 2 and all(parts) and not reference.startswith((".", "/", "~"))


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id))
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise StagediffError(f"model not found: {repo_id} (no such folder; Hugging Face download failed: {reason})") from None


@functools.lru_cache(maxsize=64)
def _read_component_config(folder: Path, component: str) -> dict:
    for name in ("config.json", "scheduler_config.json"):
        path = folder / component / name
        if path.is_file():
            return json.loads(path.read_text())
    raise StagediffError(f"model {folder} has no config for component {component!r}")


@functools.lru_cache(maxsize=64)
def _fingerprint(folder: Path, components: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for component in components:
        root = folder / component
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(_file_digest(path))
    return digest.hexdigest()[:32]


def _file_digest(path: Path) -> bytes:
    """Whole-file hash for configs and small weights; size plus head and tail for large weights."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        if size <= WHOLE_FILE_HASH_LIMIT:
            digest.update(handle.read())
        else:
            digest.update(handle.read(EDGE_BYTES))
            handle.seek(size - EDGE_BYTES)
            digest.update(handle.read(EDGE_BYTES))
    return digest.digest()
