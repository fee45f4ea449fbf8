"""The artifact store: safetensors and media files under one fsspec URI, written atomically,
verified on read.

Layout (relative to the store root):
    embeddings/<family>/<key>.safetensors
    latents/<family>/<key>.safetensors
    media/<key>.png | <key>.mp4
    runs/<run-name>/manifest.json
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import fsspec
from safetensors import SafetensorError

from stagediff import __version__
from stagediff.errors import CorruptArtifact, StagediffError, one_line

KEY_METADATA = "stagediff.key"
INPUTS_METADATA = "stagediff.inputs"
CHECKSUM_METADATA = "stagediff.checksum"
VERSION_METADATA = "stagediff.version"
LEFTOVER_PREFIX = ".tmp-"
"""Files being written are staged under this prefix beside their final name (local stores), or in the
local temporary folder under `LOCAL_TEMP_PREFIXES` (object stores); readers never look at them."""
LOCAL_TEMP_PREFIXES = ("stagediff-upload-", "stagediff-download-")
LEFTOVER_AGE_SECONDS = 3600
"""A staged file this old belongs to a writer that died: no write takes an hour."""
SUMMARY_PREFIX = "stagediff-"
"""Object-store metadata of every upload: its summary (key, checksum, ...) and its size in bytes, so that
a listing alone tells a complete artifact from a missing or foreign one."""


def content_key(inputs: Mapping) -> str:
    """The content-addressed key of an artifact: a hash of everything that changes its bytes."""
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def tensor_checksum(tensors: Mapping[str, "torch.Tensor"]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of the tensors, in name order."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


class Store:
    """Artifacts under a local folder or any fsspec URI (`gs://bucket/prefix`)."""

    def __init__(self, uri: str):
        self.uri = uri
        if uri.startswith("gs://"):
            from stagediff import gcs

            self.fs, self.root = gcs.filesystem(), uri.removeprefix("gs://")
        else:
            self.fs, self.root = fsspec.core.url_to_fs(uri)
        self.root = self.root.rstrip("/")
        self.is_local = "file" in self.fs.protocol or "local" in self.fs.protocol

    # -- paths ---------------------------------------------------------------------------------
    def path(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def uri_of(self, relative: str) -> str:
        """The URI a user can open: a plain path for local stores, `protocol://...` otherwise."""
        full = self.path(relative)
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return full if protocol in ("file", "local") else f"{protocol}://{full}"

    # -- checks --------------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Fail with a one-line error now, before any work, if the store cannot be written."""
        probe = self.path(f".write-probe-{uuid.uuid4().hex}")
        if not self.is_local:
            self._check_bucket()
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except Exception as error:
            raise StagediffError(f"store {self.uri} is not writable: {one_line(error)}") from None

    def _check_bucket(self) -> None:
        bucket = self.root.split("/", 1)[0]
        try:
            found = self.fs.exists(bucket)
        except Exception as error:
            raise StagediffError(f"store {self.uri}: cannot reach bucket {bucket!r}: {one_line(error)}") from None
        if not found:
            raise StagediffError(f"store {self.uri}: bucket {bucket!r} does not exist or is not visible to these credentials")

    def exists(self, relative: str) -> bool:
        return self.fs.exists(self.path(relative))

    def list_folder(self, relative_folder: str) -> dict[str, "Listed"]:
        """The files of a folder, by name, from one listing (paged by the object store): sizes, and on
        object stores the summaries their writers recorded. Never reads a body."""
        if self.is_local:
            try:
                entries = list(os.scandir(self.path(relative_folder)))
            except FileNotFoundError:
                return {}
            return {entry.name: Listed(entry.stat().st_size, None) for entry in entries
                    if entry.is_file() and not entry.name.startswith(LEFTOVER_PREFIX)}
        try:
            infos = self.fs.ls(self.path(relative_folder), detail=True)
        except FileNotFoundError:
            return {}
        return {info["name"].rsplit("/", 1)[-1]: Listed(int(info["size"]), _summary(info))
                for info in infos if info.get("type") == "file"}

    # -- tensors -------------------------------------------------------------------------------
    def write_tensors(self, relative: str, tensors: Mapping[str, "torch.Tensor"], key: str, inputs: Mapping) -> str:
        """Write tensors (dtype kept) with their key, key inputs, checksum and version; return the URI.
        (Only the stages read and write tensors: torch is imported here, not with the store.)"""
        from safetensors.torch import save_file

        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        metadata = {
            KEY_METADATA: key,
            INPUTS_METADATA: json.dumps(inputs, sort_keys=True, default=str),
            CHECKSUM_METADATA: tensor_checksum(tensors),
            VERSION_METADATA: __version__,
        }
        # Serialised straight to a file, never as one more in-memory copy of the tensors.
        summary = {"key": key, "checksum": metadata[CHECKSUM_METADATA]}
        with self._staged_file(relative, summary) as staged:
            save_file(tensors, staged, metadata=metadata)
        return self.uri_of(relative)

    def read_artifact(self, relative: str, key: str) -> "Artifact":
        """Read and verify tensors with their metadata. Raises CorruptArtifact if they do not parse or
        match key/checksum, FileNotFoundError if absent; I/O errors propagate as they are (transient:
        the caller retries, nothing is recomputed)."""
        from safetensors.torch import load_file

        with self._local_copy(relative) as local:
            metadata = read_safetensors_header(local, uri=self.uri_of(relative))
            try:
                tensors = load_file(local)
            except SafetensorError as error:
                raise CorruptArtifact(f"corrupt artifact {self.uri_of(relative)}: {one_line(error)}") from None
        if metadata.get(KEY_METADATA) != key:
            raise CorruptArtifact(f"artifact {self.uri_of(relative)} does not match its key {key}")
        if metadata.get(CHECKSUM_METADATA) != tensor_checksum(tensors):
            raise CorruptArtifact(f"artifact {self.uri_of(relative)} fails its checksum")
        return Artifact(tensors, metadata)

    def read_tensors(self, relative: str, key: str) -> dict[str, "torch.Tensor"]:
        """Read and verify tensors (see `read_artifact`)."""
        return self.read_artifact(relative, key).tensors

    def read_metadata(self, relative: str) -> dict[str, str]:
        """The safetensors metadata of a stored artifact (key, inputs, checksum, version)."""
        with self._local_copy(relative) as local:
            return read_safetensors_header(local, uri=self.uri_of(relative))

    def has_valid_tensors(self, relative: str, key: str) -> bool:
        """True when the artifact exists and verifies; a corrupt one is reported and counts as missing."""
        try:
            self.read_tensors(relative, key)
        except FileNotFoundError:
            return False
        except CorruptArtifact as error:
            print(f"stagediff: {error}; recomputing it")
            return False
        return True

    def leftovers(self, relative_folder: str, older_than: float = LEFTOVER_AGE_SECONDS) -> list[str]:
        """Files that writers killed mid-write left below a folder of a local store (and in the local
        temporary folder), once they are `older_than` seconds old (younger ones may be being written)."""
        candidates = []
        if self.is_local:
            for folder, _, names in os.walk(self.path(relative_folder)):
                candidates += [os.path.join(folder, name) for name in names if name.startswith(LEFTOVER_PREFIX)]
        candidates += [entry.path for entry in os.scandir(tempfile.gettempdir())
                       if entry.name.startswith(LOCAL_TEMP_PREFIXES)]
        now = time.time()
        found = []
        for path in candidates:
            with contextlib.suppress(FileNotFoundError):
                if os.path.isfile(path) and now - os.stat(path).st_mtime >= older_than:
                    found.append(path)
        return found

    def remove_leftovers(self, relative_folder: str, older_than: float = LEFTOVER_AGE_SECONDS) -> list[str]:
        """Delete `leftovers(relative_folder, older_than)`; return what was removed."""
        removed = []
        for path in self.leftovers(relative_folder, older_than):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
                removed.append(path)
        return removed

    def walk(self, relative_folder: str) -> dict[str, "Listed"]:
        """Every file below a folder (relative path → listing entry), leftovers aside; paged listings."""
        try:
            infos = self.fs.find(self.path(relative_folder), detail=True)
        except FileNotFoundError:
            return {}
        root = self.path("")
        return {
            path.removeprefix(root): Listed(int(info["size"]), None if self.is_local else _summary(info), _modified(info))
            for path, info in infos.items()
            if not path.rsplit("/", 1)[-1].startswith(LEFTOVER_PREFIX)
        }

    def copy(self, source: str, destination: str) -> str:
        """Copy a file within the store, atomically (an object store copies it server side, summary included)."""
        if self.is_local:
            with self._staged_file(destination, {}) as staged:
                shutil.copyfile(self.path(source), staged)
        else:
            self.fs.cp_file(self.path(source), self.path(destination))
        return self.uri_of(destination)

    def remove(self, relative: str) -> None:
        """Delete one file (`stagediff verify --repair`, `stagediff gc`: no stage deletes an artifact)."""
        self.fs.rm_file(self.path(relative))

    # -- bytes ---------------------------------------------------------------------------------
    def write_bytes(self, relative: str, data: bytes, summary: Mapping[str, str] | None = None) -> str:
        """Write atomically (see `_staged_file`), with `summary` in the object metadata on object stores."""
        with self._staged_file(relative, summary or {}) as staged:
            with open(staged, "wb") as file:
                file.write(data)
        return self.uri_of(relative)

    @contextlib.contextmanager
    def _staged_file(self, relative: str, summary: Mapping[str, str]) -> Iterator[str]:
        """A local file to write; on success it becomes the artifact at once, so readers never see half
        a file. Local stores rename it into place; object stores upload it in one request, and an
        object exists only once its upload completes. Concurrent writers of one key each publish a
        whole, valid artifact (same key, same content), and the last one stays."""
        final = self.path(relative)
        parent, name = final.rsplit("/", 1)
        if self.is_local:
            os.makedirs(parent, exist_ok=True)
            staged = f"{parent}/{LEFTOVER_PREFIX}{uuid.uuid4().hex}-{name}"
        else:
            handle, staged = tempfile.mkstemp(prefix=LOCAL_TEMP_PREFIXES[0], suffix=f"-{name}")
            os.close(handle)
        try:
            yield staged
            if self.is_local:
                self.fs.mv(staged, final)
            else:
                recorded = {**summary, "bytes": str(os.path.getsize(staged))}
                self.fs.put_file(staged, final, metadata={SUMMARY_PREFIX + k: v for k, v in recorded.items()})
        finally:
            if os.path.exists(staged):
                os.remove(staged)

    @contextlib.contextmanager
    def _local_copy(self, relative: str) -> Iterator[str]:
        """A local path holding the artifact: the file itself, or a streamed download."""
        if self.is_local:
            yield self.path(relative)
            return
        handle, local = tempfile.mkstemp(prefix=LOCAL_TEMP_PREFIXES[1], suffix="-" + relative.rsplit("/", 1)[-1])
        os.close(handle)
        try:
            self.fs.get_file(self.path(relative), local)
            yield local
        finally:
            os.remove(local)

    def read_bytes(self, relative: str) -> bytes:
        return self.fs.cat_file(self.path(relative))

    def write_json(self, relative: str, value) -> str:
        return self.write_bytes(relative, json.dumps(value, indent=2).encode())


@dataclass(frozen=True)
class Listed:
    """One file as a listing shows it."""

    size: int
    summary: dict[str, str] | None
    """What its writer recorded (object stores; empty when absent or for another size); None on local
    stores, whose files hold it in their headers."""
    modified: float | None = None
    """Seconds since the epoch (for `walk`)."""


@dataclass(frozen=True)
class Artifact:
    """Verified tensors of a stored artifact and its safetensors metadata."""

    tensors: dict[str, "torch.Tensor"]
    metadata: dict[str, str]


def _summary(info: dict) -> dict[str, str]:
    """What an object's writer recorded in its metadata; empty when absent or written for another size."""
    recorded = {k.removeprefix(SUMMARY_PREFIX): v for k, v in (info.get("metadata") or {}).items()
                if k.startswith(SUMMARY_PREFIX)}
    return recorded if recorded.get("bytes") == str(info["size"]) else {}


def _modified(info: dict) -> float | None:
    """The modification time in a listing entry: a number (local files) or a datetime (gcsfs)."""
    value = info.get("mtime")
    return value.timestamp() if hasattr(value, "timestamp") else value


def read_safetensors_header(path: str, uri: str | None = None) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, read from its JSON header. Raises CorruptArtifact when
    the header does not parse or the file's size is not the one its header describes (truncated or
    padded); reads only the header."""
    where = uri or path
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise CorruptArtifact(f"corrupt artifact {where}: {size} bytes, shorter than a safetensors header")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > size - 8:
            raise CorruptArtifact(f"corrupt artifact {where}: header of {header_size} bytes in a {size}-byte file")
        try:
            header = json.loads(file.read(header_size))
            data_end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
                           default=0)
        except (ValueError, TypeError, KeyError, IndexError) as error:
            raise CorruptArtifact(f"corrupt artifact {where}: unreadable header ({one_line(error)})") from None
    if 8 + header_size + data_end != size:
        raise CorruptArtifact(f"corrupt artifact {where}: {size} bytes, its header describes {8 + header_size + data_end}")
    return header.get("__metadata__", {})

