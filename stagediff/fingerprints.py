"""Content digests of model files: every byte hashed, once per machine.

A file's digest is cached by (path, size, mtime, ctime, inode, device), as git's index keys its
entries, in `~/.cache/stagediff/digests` (`STAGEDIFF_DIGEST_CACHE` moves it), so a 24 GB checkpoint is
hashed once, and again when it changes, even by a rewrite that keeps its size and mtime (`cp -p`,
`os.utime`: the ctime moves). Files of a Hugging Face cache snapshot (`models--*/snapshots/`) are links
to the same repo's blobs, named by their content hash (sha256 for LFS files, the git blob id for
others): that name is their digest, nothing is read. Links elsewhere are hashed like any file. Large files are
hashed in chunks on every core (the digest is the sha256 of the chunks' sha256s).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CACHE_VARIABLE = "STAGEDIFF_DIGEST_CACHE"
CHUNK_BYTES = 64 * 2**20
IGNORED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.pb",
                   "*.ot", "*.gguf")
"""Weight formats stagediff never loads (it loads safetensors only): they are in no identity and are
never downloaded."""

BLOB_NAME = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
"""A git blob id (sha1) or an LFS sha256: how the Hub names the blobs of its cache."""

_memory: dict[tuple, str] = {}
_memory_lock = threading.Lock()


def is_ignored_weight(path: Path) -> bool:
    return any(path.match(pattern) for pattern in IGNORED_WEIGHTS)


def digest_cache_folder() -> Path:
    base = os.environ.get(CACHE_VARIABLE) or str(Path.home() / ".cache" / "stagediff" / "digests")
    return Path(base)


def file_digest(path: Path) -> str:
    """The content digest of one file: its Hugging Face blob name, a cached digest, or every byte hashed."""
    blob = hub_blob_digest(path)
    if blob is not None:
        return blob
    stat = path.stat()
    # As git's index: a rewrite that keeps size and mtime (`cp -p`, `os.utime`) still changes ctime.
    identity = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev)
    with _memory_lock:
        if identity in _memory:
            return _memory[identity]
    cached = digest_cache_folder() / hashlib.sha256(repr(identity).encode()).hexdigest()
    try:
        digest = cached.read_text()
    except FileNotFoundError:
        digest = _hash_file(path, stat.st_size)
        cached.parent.mkdir(parents=True, exist_ok=True)
        staged = cached.with_name(f".{cached.name}.{uuid.uuid4().hex}")
        staged.write_text(digest)
        staged.replace(cached)
    with _memory_lock:
        _memory[identity] = digest
    return digest


def hub_blob_digest(path: Path) -> str | None:
    """`hf:<blob name>` for a file of a Hugging Face cache snapshot: a link that lies in a repo's
    `snapshots/` and leads into the same repo's `blobs/`, to a blob named like a content hash. Links
    anywhere else (a folder of links into some cache) are hashed like any file: they claim no identity."""
    if not path.is_symlink():
        return None
    target = Path(os.path.realpath(path))
    repo = target.parent.parent
    if target.parent.name != "blobs" or not repo.name.startswith("models--") or not BLOB_NAME.fullmatch(target.name):
        return None
    link = Path(os.path.abspath(path))
    for parent in link.parents:
        if parent.name == "snapshots":
            in_repo = parent.parent.name.startswith("models--") and os.path.realpath(parent.parent) == str(repo)
            return f"hf:{target.name}" if in_repo else None
    return None


def _hash_file(path: Path, size: int) -> str:
    if size <= CHUNK_BYTES:
        with path.open("rb") as file:
            return "sha256:" + hashlib.file_digest(file, "sha256").hexdigest()
    descriptor = os.open(path, os.O_RDONLY)
    try:
        def chunk_digest(offset: int) -> bytes:
            digest = hashlib.sha256()
            remaining = min(CHUNK_BYTES, size - offset)
            while remaining:
                data = os.pread(descriptor, min(remaining, 8 * 2**20), offset)
                if not data:
                    raise OSError(f"{path} shrank while it was hashed")
                digest.update(data)
                offset += len(data)
                remaining -= len(data)
            return digest.digest()

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            chunks = list(pool.map(chunk_digest, range(0, size, CHUNK_BYTES)))
    finally:
        os.close(descriptor)
    return "sha256-chunks:" + hashlib.sha256(b"".join(chunks)).hexdigest()
