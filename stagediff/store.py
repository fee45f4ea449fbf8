"""The artifact store: safetensors and media files under one store URI, written atomically, verified on
read. `Store(uri)` is a `LocalStore` (a plain local path) or an `ObjectStore` (`gs://bucket/prefix`);
every other scheme is refused.

Layout (relative to the store root):
    embeddings/<family>/<key>.safetensors
    latents/<family>/<key>.safetensors
    media/<key>.png | <key>.mp4
    <artifact>.corrupt                  a consuming stage's note: this version of the artifact is corrupt
    runs/<run-name>/record.json         what a run declares, written at its start (`stagediff.run_records`)
    runs/<run-name>/manifest.json
    runs/<run-name>/contact-sheet.png
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import time
import uuid
from collections.abc import Mapping
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import fsspec
from safetensors import SafetensorError

from stagediff import __version__
from stagediff.confinement import check_scheme
from stagediff.errors import CorruptArtifact, StagediffError, one_line

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

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
CORRUPT_MARKER_SUFFIX = ".corrupt"
"""`<artifact>.corrupt`: the note a consuming stage leaves beside an artifact whose body it found corrupt."""
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


class Store(ABC):
    """Artifacts under one store URI: a local folder (`LocalStore`) or `gs://bucket/prefix`
    (`ObjectStore`). `Store(uri)` returns the implementation the URI names and refuses any other
    scheme (a one-line error): fsspec never gets to pick a filesystem from a user's string.

    The two implementations differ only in how a file is listed, staged, committed and copied; what
    is done is decided from their listings by `stagediff.inventory`."""

    is_local: bool

    def __new__(cls, uri: str, *args, **kwargs):
        if cls is Store:
            check_store_uri(uri)
            cls = ObjectStore if uri.startswith("gs://") else LocalStore
        return super().__new__(cls)

    def __init__(self, uri: str):
        self.uri = uri
        self.fs = None
        self.root = ""

    # -- paths ---------------------------------------------------------------------------------
    def path(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def uri_of(self, relative: str) -> str:
        """The URI a user can open: a plain path for local stores, `protocol://...` otherwise."""
        return self.path(relative)

    # -- checks --------------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Fail with a one-line error now, before any work, if the store cannot be written."""
        probe = self.path(f".write-probe-{uuid.uuid4().hex}")
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except Exception as error:
            raise StagediffError(f"store {self.uri} is not writable: {one_line(error)}") from None

    def exists(self, relative: str) -> bool:
        return self.fs.exists(self.path(relative))

    @abstractmethod
    def list_folder(self, relative_folder: str) -> dict[str, "Listed"]:
        """The files of a folder, by name, from one listing (paged by the object store): sizes, and on
        object stores the summaries their writers recorded. Never reads a body."""

    @abstractmethod
    def walk(self, relative_folder: str) -> dict[str, "Listed"]:
        """Every file below a folder (relative path → listing entry), leftovers aside; paged listings."""

    @abstractmethod
    def recorded(self, relative: str, listed: "Listed") -> dict[str, str]:
        """What the writer of an artifact recorded about it (`key` and `checksum` of tensors,
        `latents-checksum` of media, `contact-sheet-key` of sheets): from the listing on object
        stores, from the file's header on local ones (never the body). Raises CorruptArtifact when
        the header is unreadable or the upload carries no summary."""

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
        """True when the artifact exists and verifies in full; a corrupt one is reported (logged) and
        counts as missing. For `verify` and tests: stages decide from the inventory."""
        try:
            self.read_tensors(relative, key)
        except FileNotFoundError:
            return False
        except CorruptArtifact as error:
            logger.warning("%s; recomputing it", error)
            return False
        return True

    def version_of(self, relative: str) -> str | None:
        """The listing version of one file (None when absent)."""
        folder, name = relative.rsplit("/", 1)
        listed = self.list_folder(folder).get(name)
        return listed.version if listed else None

    def mark_corrupt(self, relative: str, error: Exception) -> None:
        """Note that this very version of an artifact was found corrupt by the stage consuming it, so
        that the inventory counts it as corrupt and the stage producing it writes it again. (No stage
        deletes another stage's artifact; a rewritten artifact has a new version, and the note no
        longer applies to it.)"""
        version = self.version_of(relative)
        if version is None:
            return
        logger.warning("%s; its producing stage will write it again", one_line(error))
        self.write_json(relative + CORRUPT_MARKER_SUFFIX, {"version": version, "error": one_line(error)})

    # -- leftovers -----------------------------------------------------------------------------
    def leftovers(self, relative_folder: str, older_than: float = LEFTOVER_AGE_SECONDS) -> list[str]:
        """Files that writers killed mid-write left below a folder of the store and, of this user's own,
        in the local temporary folder, once they are `older_than` seconds old (younger ones may be being
        written)."""
        candidates = self._staged_leftovers(relative_folder)
        with contextlib.suppress(OSError):
            candidates += [entry.path for entry in os.scandir(tempfile.gettempdir())
                           if entry.name.startswith(LOCAL_TEMP_PREFIXES) and _owned(entry)]
        now = time.time()
        found = []
        for path in candidates:
            with contextlib.suppress(OSError):
                if os.path.isfile(path) and now - os.stat(path).st_mtime >= older_than:
                    found.append(path)
        return found

    def _staged_leftovers(self, relative_folder: str) -> list[str]:
        return []

    def remove_leftovers(self, relative_folder: str, older_than: float = LEFTOVER_AGE_SECONDS) -> list[str]:
        """Delete `leftovers(relative_folder, older_than)`; return what was removed. A file that cannot
        be removed (another user's) is logged and left: cleaning up never fails a stage."""
        removed = []
        for path in self.leftovers(relative_folder, older_than):
            try:
                os.remove(path)
            except FileNotFoundError:
                continue
            except OSError as error:
                logger.warning("cannot remove leftover %s: %s", path, one_line(error))
                continue
            removed.append(path)
        return removed

    # -- files ---------------------------------------------------------------------------------
    @abstractmethod
    def copy(self, source: str, destination: str) -> str:
        """Copy a file within the store, atomically (an object store copies it server side, summary included)."""

    def remove(self, relative: str) -> None:
        """Delete one file (`stagediff verify --repair`, `stagediff gc`: no stage deletes an artifact)."""
        self.fs.rm_file(self.path(relative))

    def write_bytes(self, relative: str, data: bytes, summary: Mapping[str, str] | None = None) -> str:
        """Write atomically (see `_staged_file`), with `summary` in the object metadata on object stores."""
        with self._staged_file(relative, summary or {}) as staged:
            with open(staged, "wb") as file:
                file.write(data)
        return self.uri_of(relative)

    @abstractmethod
    def _staged_file(self, relative: str, summary: Mapping[str, str]):
        """A local file to write; on success it becomes the artifact at once, so readers never see half
        a file. Concurrent writers of one key each publish a whole, valid artifact (same key, same
        content), and the last one stays."""

    @abstractmethod
    def _local_copy(self, relative: str):
        """A local path holding the artifact: the file itself, or a streamed download."""

    def read_bytes(self, relative: str) -> bytes:
        return self.fs.cat_file(self.path(relative))

    def write_json(self, relative: str, value) -> str:
        return self.write_bytes(relative, json.dumps(value, indent=2).encode())


class LocalStore(Store):
    """A folder on a local (or mounted) disk: files are staged beside their final name and renamed
    into place; what a writer recorded is read from each file's header."""

    is_local = True

    def __init__(self, uri: str):
        super().__init__(uri)
        self.fs = fsspec.filesystem("file")
        self.root = os.path.abspath(os.path.expanduser(uri)).rstrip("/") or "/"

    def list_folder(self, relative_folder):
        try:
            entries = list(os.scandir(self.path(relative_folder)))
        except FileNotFoundError:
            return {}
        listed = {}
        for entry in entries:
            if entry.name.startswith(LEFTOVER_PREFIX):
                continue
            with contextlib.suppress(FileNotFoundError):
                if entry.is_file():
                    listed[entry.name] = _listed_file(entry.stat())
        return listed

    def walk(self, relative_folder):
        top = self.path(relative_folder)
        found = {}
        prefix = self.path("")
        for folder, _, names in os.walk(top):
            for name in names:
                if name.startswith(LEFTOVER_PREFIX):
                    continue
                full = os.path.join(folder, name)
                with contextlib.suppress(FileNotFoundError):
                    found[full.removeprefix(prefix)] = _listed_file(os.stat(full))
        return found

    def recorded(self, relative, listed):
        full = self.path(relative)
        if relative.endswith(".safetensors"):
            metadata = read_safetensors_header(full)
            return {"key": metadata.get(KEY_METADATA), "checksum": metadata.get(CHECKSUM_METADATA)}
        from stagediff.containers import IncompleteFile, file_reader, mp4_metadata, png_metadata

        read_metadata = png_metadata if relative.endswith(".png") else mp4_metadata
        try:
            with open(full, "rb") as file:
                metadata = read_metadata(file_reader(file), listed.size)
        except (IncompleteFile, ValueError) as error:
            raise CorruptArtifact(f"corrupt artifact {full}: {one_line(error)}") from None
        # The media's own names (`latents_checksum`) as summaries spell them (`latents-checksum`).
        return {name.replace("_", "-"): value for name, value in metadata.items() if isinstance(value, str)}

    def _staged_leftovers(self, relative_folder):
        return [os.path.join(folder, name) for folder, _, names in os.walk(self.path(relative_folder))
                for name in names if name.startswith(LEFTOVER_PREFIX)]

    def copy(self, source, destination):
        with self._staged_file(destination, {}) as staged:
            shutil.copyfile(self.path(source), staged)
        return self.uri_of(destination)

    @contextlib.contextmanager
    def _staged_file(self, relative, summary):
        final = self.path(relative)
        parent, name = final.rsplit("/", 1)
        os.makedirs(parent, exist_ok=True)
        staged = f"{parent}/{LEFTOVER_PREFIX}{uuid.uuid4().hex}-{name}"
        try:
            yield staged
            self.fs.mv(staged, final)
        finally:
            if os.path.exists(staged):
                os.remove(staged)

    @contextlib.contextmanager
    def _local_copy(self, relative):
        yield self.path(relative)


class ObjectStore(Store):
    """A bucket prefix (`gs://bucket/prefix`, or any fsspec filesystem given with `on`): each file is
    uploaded whole in one request, with a summary of what it holds in its object metadata, so that a
    listing alone tells a complete artifact from a missing or foreign one."""

    is_local = False

    def __init__(self, uri: str):
        super().__init__(uri)
        from stagediff import gcs

        self.fs, self.root, self.protocol = gcs.filesystem(), uri.removeprefix("gs://").rstrip("/"), "gs"

    @classmethod
    def on(cls, fs, root: str, protocol: str) -> "ObjectStore":
        """An object store on a filesystem of the caller's choosing (tests: a flaky network)."""
        store = object.__new__(cls)
        Store.__init__(store, f"{protocol}://{root}")
        store.fs, store.root, store.protocol = fs, root.rstrip("/"), protocol
        return store

    def uri_of(self, relative):
        return f"{self.protocol}://{self.path(relative)}"

    def check_writable(self):
        bucket = self.root.split("/", 1)[0]
        try:
            found = self.fs.exists(bucket)
        except Exception as error:
            raise StagediffError(f"store {self.uri}: cannot reach bucket {bucket!r}: {one_line(error)}") from None
        if not found:
            raise StagediffError(f"store {self.uri}: bucket {bucket!r} does not exist or is not visible to these credentials")
        super().check_writable()

    def list_folder(self, relative_folder):
        try:
            infos = self.fs.ls(self.path(relative_folder), detail=True)
        except FileNotFoundError:
            return {}
        return {info["name"].rsplit("/", 1)[-1]: _listed_object(info)
                for info in infos if info.get("type") == "file"}

    def walk(self, relative_folder):
        try:
            infos = self.fs.find(self.path(relative_folder), detail=True)
        except FileNotFoundError:
            return {}
        root = self.path("")
        return {path.removeprefix(root): _listed_object(info) for path, info in infos.items()
                if not path.rsplit("/", 1)[-1].startswith(LEFTOVER_PREFIX)}

    def recorded(self, relative, listed):
        if not listed.summary:
            raise CorruptArtifact(f"artifact {self.uri_of(relative)} carries no summary of its own size")
        return dict(listed.summary)

    def copy(self, source, destination):
        self.fs.cp_file(self.path(source), self.path(destination))
        return self.uri_of(destination)

    @contextlib.contextmanager
    def _staged_file(self, relative, summary):
        name = relative.rsplit("/", 1)[-1]
        handle, staged = tempfile.mkstemp(prefix=LOCAL_TEMP_PREFIXES[0], suffix=f"-{name}")
        os.close(handle)
        try:
            yield staged
            recorded = {**summary, "bytes": str(os.path.getsize(staged))}
            self.fs.put_file(staged, self.path(relative),
                             metadata={SUMMARY_PREFIX + k: v for k, v in recorded.items()})
        finally:
            if os.path.exists(staged):
                os.remove(staged)

    @contextlib.contextmanager
    def _local_copy(self, relative):
        handle, local = tempfile.mkstemp(prefix=LOCAL_TEMP_PREFIXES[1], suffix="-" + relative.rsplit("/", 1)[-1])
        os.close(handle)
        try:
            self.fs.get_file(self.path(relative), local)
            yield local
        finally:
            os.remove(local)


def quarantined_version(store: Store, relative: str) -> str | None:
    """The version of `relative` that `Store.mark_corrupt` noted (FileNotFoundError without a note)."""
    try:
        return json.loads(store.read_bytes(relative + CORRUPT_MARKER_SUFFIX)).get("version")
    except ValueError:
        return None


def check_store_uri(uri: str) -> None:
    """A store is a plain local path or a `gs://bucket/prefix` without `.`/`..` segments; any other
    scheme (`file://`, `gcs://`, `memory://`, chained URLs) is refused with one line."""
    check_scheme("--store", uri)
    if uri.startswith("gs://"):
        segments = uri.removeprefix("gs://").split("/")
        if not segments[0] or any(segment in (".", "..") for segment in segments):
            raise StagediffError(f"--store {uri}: a gs:// store is gs://bucket/prefix, without '.' or '..' segments")


def _owned(entry: os.DirEntry) -> bool:
    """A file of the shared temporary folder that this user wrote (others' are theirs to clean)."""
    try:
        return entry.stat(follow_symlinks=False).st_uid == os.getuid()
    except OSError:
        return False


def _listed_file(stat: os.stat_result) -> "Listed":
    version = f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:{stat.st_ino}:{stat.st_dev}"
    return Listed(stat.st_size, None, stat.st_mtime, version)


def _listed_object(info: dict) -> "Listed":
    version = info.get("generation") or info.get("md5Hash") or info.get("crc32c") or info.get("etag")
    return Listed(int(info["size"]), _summary(info), _modified(info),
                  f"{info['size']}:{version}" if version is not None else None)


@dataclass(frozen=True)
class Listed:
    """One file as a listing shows it."""

    size: int
    summary: dict[str, str] | None
    """What its writer recorded (object stores; empty when absent or for another size); None on local
    stores, whose files hold it in their headers."""
    modified: float | None = None
    """Seconds since the epoch."""
    version: str | None = None
    """Changes whenever the file is written again (local: size, mtime, ctime, inode, device; objects:
    their generation): what a contact sheet or a recheck compares. None when the listing has none."""


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

