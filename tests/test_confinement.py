"""Confinement: with STAGEDIFF_ALLOWED_ROOTS set only plain local paths and gs:// URIs without `.`/`..`
segments under the roots are accepted, whatever the URI's form; without roots, only the schemes stagediff
supports. Leftovers in the shared temporary folder: only this user's are removed, and another user's
never fail a stage."""

from __future__ import annotations

import os
import tempfile
import time

import pytest

from helpers import snapshot
from stagediff.cli import main
from stagediff.confinement import ALLOWED_ROOTS_VARIABLE
from stagediff.errors import StagediffError
from stagediff.store import LocalStore, ObjectStore, Store


def _generate(tiny_sdxl, store: str) -> list[str]:
    return ["generate", "--model", str(tiny_sdxl), "--prompt", "a cat", "--seed", "0", "--steps", "2",
            "--store", store]


@pytest.mark.parametrize("form", ["file-uri", "gcs-scheme", "memory", "gs-dotdot", "chained"])
def test_with_roots_every_uri_form_of_an_outside_store_is_refused(form, tiny_sdxl, tmp_path, monkeypatch, capsys):
    """The reproduction: with roots = $PWD, `--store file:///data/elsewhere` wrote to /data/elsewhere."""
    allowed, elsewhere = tmp_path / "allowed", tmp_path / "elsewhere"
    allowed.mkdir()
    monkeypatch.chdir(allowed)
    monkeypatch.setenv(ALLOWED_ROOTS_VARIABLE, f"{allowed},{tiny_sdxl},gs://allowed-bucket/stagediff")
    store = {"file-uri": f"file://{elsewhere}", "gcs-scheme": "gcs://any-bucket/x", "memory": "memory://x",
             "gs-dotdot": "gs://other-bucket/../allowed-bucket/stagediff",
             "chained": f"simplecache::file://{elsewhere}"}[form]
    before = snapshot(tmp_path)
    assert main(_generate(tiny_sdxl, store)) == 2
    error = capsys.readouterr().err
    assert store in error and error.count("\n") == 1
    assert snapshot(tmp_path) == before and not elsewhere.exists()


@pytest.mark.parametrize("store", ["file:///tmp/x", "memory://x", "gcs://bucket/x", "s3://bucket/x", "data:,x"])
def test_without_roots_unsupported_schemes_are_refused(store, tiny_sdxl, monkeypatch, capsys):
    monkeypatch.delenv(ALLOWED_ROOTS_VARIABLE, raising=False)
    assert main(_generate(tiny_sdxl, store)) == 2
    error = capsys.readouterr().err
    assert f"--store {store}: scheme" in error and error.count("\n") == 1


@pytest.mark.parametrize("uri", ["file:///tmp/x", "memory://x", "gcs://b/x", "gs://b/../c", "gs://b/./c"])
def test_the_store_factory_refuses_what_it_does_not_support(uri):
    with pytest.raises(StagediffError, match="--store"):
        Store(uri)


def test_the_store_factory_picks_one_implementation_per_uri(tmp_path, emulator):
    assert type(Store(str(tmp_path))) is LocalStore
    assert type(Store("gs://some-bucket/prefix")) is ObjectStore
    assert Store("relative/folder").root == os.path.abspath("relative/folder")


def test_with_roots_a_plain_path_and_a_gs_uri_inside_them_are_accepted(monkeypatch, tmp_path):
    from stagediff.confinement import check_location

    monkeypatch.setenv(ALLOWED_ROOTS_VARIABLE, f"{tmp_path},gs://allowed-bucket/stagediff")
    check_location("--store", str(tmp_path / "store"))
    check_location("--store", "gs://allowed-bucket/stagediff/store")
    with pytest.raises(StagediffError, match="outside the roots"):
        check_location("--store", "gs://allowed-bucket/other")


def test_only_this_users_leftovers_in_the_temporary_folder_are_candidates(tmp_path, monkeypatch):
    """Another user's crash leftover (here: a file this user does not own, as seen through a uid that is
    not ours) is neither listed nor removed."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ours = tmp_path / "stagediff-upload-ours"
    ours.write_bytes(b"x")
    os.utime(ours, (time.time() - 7200,) * 2)
    store = Store(str(tmp_path / "store"))
    assert str(ours) in store.leftovers("latents")
    monkeypatch.setattr(os, "getuid", lambda: os.stat(ours).st_uid + 1)  # now it is someone else's
    assert store.leftovers("latents") == []
    assert store.remove_leftovers("latents") == [] and ours.exists()


def test_a_leftover_that_cannot_be_removed_never_fails_a_stage(tmp_path, monkeypatch, caplog):
    """Before: a PermissionError from another user's file in /tmp failed every stage."""
    locked = tmp_path / "locked"
    locked.mkdir()
    leftover = locked / ".tmp-0000-k.safetensors"
    leftover.write_bytes(b"x")
    os.utime(leftover, (time.time() - 7200,) * 2)
    if os.geteuid() == 0:  # root removes any file: the kernel's refusal is injected instead
        remove = os.remove

        def refused(path, *args, **kwargs):
            if str(path) == str(leftover):
                raise PermissionError(1, "Operation not permitted", str(path))
            return remove(path, *args, **kwargs)

        monkeypatch.setattr(os, "remove", refused)
    locked.chmod(0o500)
    try:
        assert Store(str(tmp_path)).remove_leftovers("locked") == []
    finally:
        locked.chmod(0o700)
    assert leftover.exists() and "cannot remove leftover" in caplog.text


@pytest.mark.parametrize("command", ["verify", "gc"])
def test_store_upkeep_commands_are_confined_too(command, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ALLOWED_ROOTS_VARIABLE, str(tmp_path / "allowed"))
    for store in (str(tmp_path / "elsewhere"), f"file://{tmp_path}/allowed/store"):
        assert main([command, store]) == 2
        assert store in capsys.readouterr().err
