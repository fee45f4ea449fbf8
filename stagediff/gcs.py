"""Google Cloud Storage through gcsfs: filesystem options, and mirroring `gs://` model folders.

Credentials are whatever gcsfs resolves (application default credentials, a service account, the
metadata server on GCE/TPU VMs). `STORAGE_EMULATOR_HOST` points at an emulator (anonymous access);
`STAGEDIFF_GCS_TOKEN=anon` asks for anonymous access to public buckets.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from stagediff.errors import StagediffError, one_line

# gcsfs otherwise probes each bucket's type over gRPC, which an http emulator never answers
# (about 80 s of retries per bucket). Read when gcsfs is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

EMULATOR_VARIABLE = "STORAGE_EMULATOR_HOST"
TOKEN_VARIABLE = "STAGEDIFF_GCS_TOKEN"
MODEL_CACHE_VARIABLE = "STAGEDIFF_MODEL_CACHE"
MIRROR_INDEX = ".stagediff-mirror.json"
PARTIAL_SUFFIX = ".partial"
PARTIAL_AGE_SECONDS = 3600


def storage_options() -> dict:
    """gcsfs options: no listings cache (other workers write too), emulator and token from the env."""
    options: dict = {"use_listings_cache": False}
    emulator = os.environ.get(EMULATOR_VARIABLE)
    if emulator:
        options["endpoint_url"] = emulator if "://" in emulator else f"http://{emulator}"
        options["token"] = "anon"
    elif os.environ.get(TOKEN_VARIABLE) == "anon":
        options["token"] = "anon"
    return options


def filesystem():
    import gcsfs

    return gcsfs.GCSFileSystem(**storage_options())


def bucket_of(uri: str) -> str:
    return uri.removeprefix("gs://").split("/", 1)[0]


@dataclass(frozen=True)
class Mirror:
    folder: Path
    downloaded: int
    """Files fetched this time (0 when the local copy was up to date)."""


def model_cache_root() -> Path:
    base = os.environ.get(MODEL_CACHE_VARIABLE) or str(Path.home() / ".cache" / "stagediff" / "models")
    return Path(base)


def mirror_folder(uri: str) -> Mirror:
    """Copy a `gs://` folder into the local model cache, fetching only files whose content changed
    (compared by size and the object's md5/crc32c against the last mirror's index)."""
    fs = filesystem()
    remote = _object_path(uri)
    if "/" not in remote:
        raise StagediffError(f"--model {uri} is not a folder in a bucket (gs://bucket/path/to/model)")
    try:
        listing = fs.find(remote, detail=True)
    except Exception as error:
        raise StagediffError(f"cannot list model {uri} in bucket {bucket_of(uri)!r}: {one_line(error)}") from None
    if not listing:
        raise StagediffError(f"model not found: {uri} (no objects under it)")
    objects = {path: (_relative_object_name(path, remote, uri), info) for path, info in listing.items()}
    folder = model_cache_root() / remote
    return Mirror(folder, _fetch_changed(fs, folder, objects, follow=True))


def mirror_file(uri: str, option: str) -> Path:
    """The local copy of one `gs://` object in the model cache, fetched again only when it changed."""
    fs = filesystem()
    remote = _object_path(uri)
    try:
        info = fs.info(remote) if "/" in remote else None
    except FileNotFoundError:
        info = None
    except Exception as error:
        raise StagediffError(f"{option} {uri}: cannot read it in bucket {bucket_of(uri)!r}: {one_line(error)}") from None
    if info is None or info.get("type") != "file":
        raise StagediffError(f"{option} {uri}: no such file")
    folder, name = model_cache_root() / posixpath.dirname(remote), posixpath.basename(remote)
    _fetch_changed(fs, folder, {remote: (name, info)})
    return folder / name


def read_location(location: str) -> bytes:
    """The bytes of a local file or a `gs://` object."""
    if location.startswith("gs://"):
        return filesystem().cat_file(location.removeprefix("gs://"))
    with open(location, "rb") as file:
        return file.read()


def _object_path(uri: str) -> str:
    """`bucket/path` of a gs:// URI, normalised; a one-line error for one that climbs out of its bucket."""
    remote = posixpath.normpath(uri.removeprefix("gs://")).strip("/")
    if remote.startswith(".."):
        raise StagediffError(f"{uri} is not a path in a bucket")
    return remote


def _fetch_changed(fs, folder: Path, objects: dict[str, tuple[str, dict]], follow: bool = False) -> int:
    """Download each object (remote path → (name under `folder`, listing info)) whose size and checksum
    differ from those `folder`'s mirror index recorded; return how many were fetched. With `follow`
    (a whole model folder), files the bucket no longer holds are removed from the mirror too, so that
    every machine's mirror of one folder holds the same files (and gives the same keys). The index is
    replaced atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    index_path = folder / MIRROR_INDEX
    try:
        index = json.loads(index_path.read_text()) if index_path.exists() else {}
    except ValueError:  # unreadable: every file is compared again
        index = {}
    downloaded = 0
    for path, (relative, info) in sorted(objects.items()):
        fingerprint = [info.get("size"), info.get("md5Hash") or info.get("crc32c")]
        local = folder / relative
        if index.get(relative) == fingerprint and local.exists():
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(f".{local.name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}")
        fs.get_file(path, str(partial))
        partial.replace(local)
        index[relative] = fingerprint
        downloaded += 1
    if follow:
        wanted = {relative for relative, _ in objects.values()}
        for local in sorted(folder.rglob("*")):
            relative = local.relative_to(folder).as_posix()
            if local.is_dir() or relative == MIRROR_INDEX or relative in wanted or _being_written(local):
                continue
            local.unlink(missing_ok=True)
            index.pop(relative, None)
        index = {relative: value for relative, value in index.items() if relative in wanted}
    staged = index_path.with_name(f".{index_path.name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}")
    staged.write_text(json.dumps(index, indent=1))
    staged.replace(index_path)
    return downloaded


def is_partial(path: Path) -> bool:
    """A download in progress (or one a killed process left): never part of a model's files."""
    return path.name.startswith(".") and path.name.endswith(PARTIAL_SUFFIX)


def _being_written(path: Path) -> bool:
    """A partial download young enough to belong to a live process (an older one is removed)."""
    try:
        return is_partial(path) and time.time() - path.stat().st_mtime < PARTIAL_AGE_SECONDS
    except FileNotFoundError:
        return True


def _relative_object_name(path: str, remote: str, uri: str) -> str:
    """An object's name inside the model folder, normalised; a one-line error for a name that leads out
    of it (`models/m/../../x`), which would otherwise be written outside the model cache."""
    relative = posixpath.normpath(path.removeprefix(remote + "/")) if path.startswith(remote + "/") else ".."
    if relative == ".." or relative.startswith("../") or relative.startswith("/"):
        raise StagediffError(f"model {uri}: object {path!r} leads outside the model folder")
    return relative
