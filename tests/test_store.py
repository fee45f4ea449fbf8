"""The artifact store: content keys, atomic writes, verification on read, dtypes and metadata."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import time

import fsspec
import fsspec.implementations.local
import pytest
import torch

from stagediff import __version__
from stagediff.errors import CorruptArtifact, StagediffError
from stagediff.store import ObjectStore, Store, content_key

INPUTS = {"family": "sdxl", "prompt": "a red cat", "negative_prompt": None, "dtype": "float32", "encoder": {}}


def test_content_key_is_stable_and_ignores_key_order():
    reordered = dict(reversed(list(INPUTS.items())))
    assert content_key(INPUTS) == content_key(reordered)


@pytest.mark.parametrize(
    "change", [{"prompt": "a red dog"}, {"negative_prompt": "blurry"}, {"dtype": "bfloat16"}, {"encoder": {"max": 77}}]
)
def test_content_key_changes_with_every_input(change):
    assert content_key({**INPUTS, **change}) != content_key(INPUTS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensors_round_trip_with_dtype_and_metadata(tmp_path, dtype):
    store = Store(str(tmp_path))
    tensors = {"latents": torch.randn(1, 4, 8, 8).to(dtype), "pooled": torch.randn(1, 32).to(dtype)}
    key = content_key(INPUTS)
    uri = store.write_tensors("latents/sdxl/x.safetensors", tensors, key, INPUTS)

    assert uri == str(tmp_path / "latents/sdxl/x.safetensors")
    loaded = store.read_tensors("latents/sdxl/x.safetensors", key)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == dtype
        assert torch.equal(loaded[name], tensor)
    metadata = store.read_metadata("latents/sdxl/x.safetensors")
    assert metadata["stagediff.key"] == key
    assert json.loads(metadata["stagediff.inputs"]) == INPUTS
    assert metadata["stagediff.version"] == __version__


def _written(tmp_path):
    store = Store(str(tmp_path))
    key = content_key(INPUTS)
    store.write_tensors("e.safetensors", {"x": torch.arange(64, dtype=torch.float32)}, key, INPUTS)
    return store, key, tmp_path / "e.safetensors"


def test_truncated_artifact_is_reported_and_counts_as_missing(tmp_path, caplog):
    store, key, path = _written(tmp_path)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CorruptArtifact, match="corrupt artifact"):
        store.read_tensors("e.safetensors", key)
    assert not store.has_valid_tensors("e.safetensors", key)
    assert "recomputing" in caplog.text  # through logging, not print


def test_flipped_tensor_byte_fails_the_checksum(tmp_path):
    store, key, path = _written(tmp_path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifact, match="checksum"):
        store.read_tensors("e.safetensors", key)


def test_artifact_under_another_key_is_rejected(tmp_path):
    store, _, _ = _written(tmp_path)
    with pytest.raises(CorruptArtifact, match="does not match its key"):
        store.read_tensors("e.safetensors", "0" * 32)


def test_writer_killed_before_commit_leaves_no_artifact(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from stagediff.store import Store
        store = Store({str(tmp_path)!r})
        store.fs.mv = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
        store.write_tensors("latents/sdxl/k.safetensors", {{"latents": torch.zeros(1024, 1024)}}, "k", {{}})
        """
    )
    process = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert process.returncode == -9
    store = Store(str(tmp_path))
    assert not store.exists("latents/sdxl/k.safetensors")
    assert not store.has_valid_tensors("latents/sdxl/k.safetensors", "k")


def test_unwritable_store_fails_with_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(StagediffError, match=r"store .*a-file/store is not writable") as error:
        Store(str(blocker / "store")).check_writable()
    assert "\n" not in str(error.value)


class FlakyFileSystem(fsspec.implementations.local.LocalFileSystem):
    """A local folder reached like an object store, whose downloads fail while `failing` is set: the
    network between a worker and its bucket."""

    protocol = ("flaky",)
    root_marker = "/"
    failing = False

    def get_file(self, rpath, lpath, **kwargs):
        if FlakyFileSystem.failing:
            raise ConnectionResetError("connection reset by peer")
        return super().get_file(rpath, lpath, **kwargs)


fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


def test_an_io_error_while_reading_is_no_corruption_and_recomputes_nothing(tmp_path, monkeypatch):
    store = ObjectStore.on(FlakyFileSystem(), str(tmp_path), "flaky")
    key = content_key(INPUTS)
    store.write_tensors("e.safetensors", {"x": torch.ones(4)}, key, INPUTS)
    before = (tmp_path / "e.safetensors").read_bytes()
    monkeypatch.setattr(FlakyFileSystem, "failing", True)
    with pytest.raises(ConnectionResetError):
        store.has_valid_tensors("e.safetensors", key)
    with pytest.raises(ConnectionResetError):
        store.read_tensors("e.safetensors", key)
    assert (tmp_path / "e.safetensors").read_bytes() == before
    monkeypatch.setattr(FlakyFileSystem, "failing", False)
    assert store.has_valid_tensors("e.safetensors", key)


@pytest.mark.parametrize("header_size", [2**62, 10**6])
def test_a_header_size_beyond_the_file_is_corruption_not_a_huge_read(tmp_path, header_size):
    store, key, path = _written(tmp_path)
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", header_size)
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifact, match="header of"):
        store.read_tensors("e.safetensors", key)


def test_a_file_longer_than_its_header_describes_is_corrupt(tmp_path):
    store, key, path = _written(tmp_path)
    path.write_bytes(path.read_bytes() + b"\0" * 16)
    with pytest.raises(CorruptArtifact, match="its header describes"):
        store.read_metadata("e.safetensors")


def test_leftovers_of_killed_writers_are_removed_once_old(tmp_path):
    store = Store(str(tmp_path))
    folder = tmp_path / "latents/sdxl"
    folder.mkdir(parents=True)
    old, fresh = folder / ".tmp-0123-k.safetensors", folder / ".tmp-4567-k.safetensors"
    old.write_bytes(b"half a file")
    fresh.write_bytes(b"being written")
    os.utime(old, (time.time() - 2 * 3600,) * 2)
    artifact = folder / "k.safetensors"
    artifact.write_bytes(b"an artifact, however old")
    os.utime(artifact, (time.time() - 2 * 3600,) * 2)
    removed = store.remove_leftovers("latents/sdxl")
    assert str(old) in removed and str(fresh) not in removed
    assert fresh.exists() and artifact.exists() and not old.exists()
