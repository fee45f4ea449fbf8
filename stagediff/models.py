"""Model checkpoints: where a `--model` lives, which family it is, and the identity of its components."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from stagediff.errors import StagediffError
from stagediff.families import Family, family_for_pipeline
from stagediff.fingerprints import file_digest, is_ignored_weight
from stagediff.hub import HubSnapshot, open_snapshot

HUB_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""A commit, branch or tag name given as `--model org/name@REVISION`."""


@dataclass(frozen=True)
class Model:
    """A diffusers checkpoint folder on local disk, with its family."""

    reference: str
    """What the user passed to --model (Hugging Face id, folder or gs:// URI)."""
    folder: Path
    family: Family
    model_index: dict
    hub: HubSnapshot | None = None
    """The Hugging Face snapshot behind `folder`, whose components are fetched when a stage loads them."""

    def config_of(self, component: str) -> dict:
        """The JSON config of one component (`unet`, `vae`, `scheduler`, ...)."""
        return _read_component_config(self.folder, component)

    def components(self) -> tuple[str, ...]:
        """Names of all pipeline components listed in model_index.json."""
        return tuple(name for name, value in self.model_index.items() if not name.startswith("_") and isinstance(value, list))

    @property
    def revision(self) -> str | None:
        """The Hugging Face commit of a hub model (None for folders)."""
        return self.hub.revision if self.hub else None

    def fingerprint(self, components: tuple[str, ...]) -> str:
        """The identity of the named components: the content digest of every file they load (weights in
        formats stagediff never loads aside) and the model_index.json entries that change their numbers
        (the pipeline's own settings, such as SDXL's `force_zeros_for_empty_prompt`, and the
        components' classes). Changes whenever any byte of those changes."""
        digest = hashlib.sha256()
        digest.update(json.dumps(self._index_entries(components), sort_keys=True).encode())
        for component in sorted(components):
            for path in self._component_paths(component):
                if not is_ignored_weight(Path(path)):
                    digest.update(f"{path}\0{self._file_digest(path)}\n".encode())
        return digest.hexdigest()[:32]

    def fetch(self, components: tuple[str, ...]) -> None:
        """Make the components' files local (hub models download them now; folders have them)."""
        if self.hub:
            self.hub.fetch(components)

    def check_safetensors(self, components: tuple[str, ...]) -> None:
        """Fail with a one-line error for a component whose weights exist only in formats that are not
        safetensors (stagediff never unpickles weights)."""
        for component in components:
            paths = [Path(path) for path in self._component_paths(component)]
            if any(is_ignored_weight(path) for path in paths) and not any(path.suffix == ".safetensors" for path in paths):
                formats = sorted({path.suffix for path in paths if is_ignored_weight(path)})
                raise StagediffError(f"model {self.reference}: component {component!r} has weights only as "
                                     f"{', '.join(formats)}; stagediff loads safetensors weights only")

    def weight_shapes(self, component: str) -> dict[str, tuple[int, ...]]:
        """Name → shape of every tensor in the component's safetensors files, from their headers only (a hub
        model's read from the Hub when its weights are not downloaded)."""
        from safetensors import safe_open

        shapes: dict[str, tuple[int, ...]] = {}
        for path in self._component_paths(component):
            if not path.endswith(".safetensors"):
                continue
            local = self.folder / path
            if not local.is_file() and self.hub:
                shapes.update(self.hub.weight_shapes(path))
                continue
            with safe_open(local, framework="pt") as weights:
                shapes.update({name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()})
        return shapes

    def library_of(self, component: str) -> str | None:
        """The library a component's class comes from (`diffusers`, `transformers`), as model_index.json says."""
        entry = self.model_index.get(component)
        return entry[0] if isinstance(entry, list) and entry else None

    def _index_entries(self, components: tuple[str, ...]) -> dict:
        return {
            name: value for name, value in self.model_index.items()
            if name in components or name == "_class_name" or not (name.startswith("_") or isinstance(value, list))
        }

    def _component_paths(self, component: str) -> list[str]:
        """The component's files, relative to the model, sorted (a hub model's whether fetched or not)."""
        if self.hub:
            return sorted(path for path in self.hub.file_digests if path.startswith(f"{component}/"))
        root = self.folder / component
        # A download in progress (a gs:// mirror being refreshed) is no file of the model's.
        return sorted(str(path.relative_to(self.folder)) for path in root.rglob("*")
                      if path.is_file() and not (path.name.startswith(".") and path.name.endswith(".partial")))

    def _file_digest(self, path: str) -> str:
        return self.hub.file_digests[path] if self.hub else file_digest(self.folder / path)


def open_model(reference: str) -> Model:
    """Resolve `--model` to a local diffusers folder and detect its family."""
    hub = None
    if reference.startswith("gs://"):
        from stagediff.gcs import mirror_folder

        folder = mirror_folder(reference).folder
    else:
        folder = _local_folder(reference)
        if folder is None:
            hub = open_snapshot(*split_hub_reference(reference))
            folder = hub.folder
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise StagediffError(f"not a diffusers model folder (no model_index.json): {reference}")
    try:
        model_index = json.loads(index_path.read_text())
    except json.JSONDecodeError as error:
        raise StagediffError(f"unreadable model_index.json in {reference}: {error}") from None
    family = family_for_pipeline(str(model_index.get("_class_name")), f"{reference}/model_index.json")
    return Model(reference=reference, folder=folder, family=family, model_index=model_index, hub=hub)


def _local_folder(reference: str) -> Path | None:
    """The folder `reference` names; None for a Hugging Face id; a one-line error for anything else."""
    path = Path(reference).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise StagediffError(f"--model {reference} is a file, not a diffusers model folder")
    repo_id, revision = split_hub_reference(reference)
    if not looks_like_hub_id(repo_id):
        raise StagediffError(f"model not found: {reference} (no such folder)")
    if revision is not None and not HUB_REVISION.fullmatch(revision):
        raise StagediffError(f"--model {reference}: revision {revision!r} is not a commit, branch or tag name")
    return None


def is_hub_id(reference: str) -> bool:
    """True for a Hugging Face id: `org/name` or `org/name@revision`, not a gs:// URI, and nothing at that
    path here."""
    return looks_like_hub_id(split_hub_reference(reference)[0]) and not Path(reference).expanduser().exists()


def split_hub_reference(reference: str) -> tuple[str, str | None]:
    """`org/name@revision` → (`org/name`, `revision`); (`org/name`, None) without a revision."""
    repo_id, _, revision = reference.partition("@")
    return repo_id, revision or None


def pinned_reference(model: Model) -> str:
    """The `--model` that names exactly this model: a Hub id with the commit it resolved to
    (`org/name@<commit>`), so that every stage of a run, in any process, loads that commit."""
    if model.hub is None:
        return model.reference
    return f"{model.hub.repo_id}@{model.hub.revision}"


def looks_like_hub_id(reference: str) -> bool:
    parts = reference.split("/")
    return len(parts) == 2 and all(parts) and not reference.startswith((".", "/", "~"))


def _read_component_config(folder: Path, component: str) -> dict:
    for name in ("config.json", "scheduler_config.json"):
        path = folder / component / name
        if path.is_file():
            stat = path.stat()
            return _read_json(path, stat.st_mtime_ns, stat.st_size)
    raise StagediffError(f"model {folder} has no config for component {component!r}")


@functools.lru_cache(maxsize=256)
def _read_json(path: Path, mtime_ns: int, size: int) -> dict:
    """A JSON file, read again when it changes (long-lived workers see checkpoints saved in place)."""
    return json.loads(path.read_text())
