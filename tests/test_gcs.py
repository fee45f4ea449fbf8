"""The gs:// store and gs:// models, against a real GCS emulator (fake-gcs-server) on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gcs_emulator import BUCKET, FaultyProxy
from helpers import run_all_stages
from stagediff import gcs
from stagediff.errors import StagediffError
from stagediff.models import open_model
from stagediff.plan import make_plan
from stagediff.request import Request
from stagediff.store import Store



@pytest.fixture
def store_uri(emulator, request):
    return f"gs://{BUCKET}/{request.node.name.replace('[', '-').replace(']', '')}"


def generations(uri: str) -> dict[str, str]:
    fs = gcs.filesystem()
    return {path: info["generation"] for path, info in fs.find(uri.removeprefix("gs://"), detail=True).items()}


def test_generation_on_a_gs_store_and_a_rerun_rewrites_nothing(tiny_sdxl, store_uri):
    request = Request(model=str(tiny_sdxl), prompts=["a red cat", "a blue dog"], seeds=[0], steps=2, store=store_uri)
    first = run_all_stages(request)
    assert {stage: r.computed for stage, r in first.items()} == {"encode": 2, "denoise": 2, "decode": 2}
    before = generations(store_uri)
    assert sum(path.endswith(".png") for path in before) == 2

    again = run_all_stages(request)
    assert {stage: r.computed for stage, r in again.items()} == {"encode": 0, "denoise": 0, "decode": 0}
    assert generations(store_uri) == before
    item = make_plan(request).items[0]
    assert make_plan(request).store.uri_of(item.media_path).startswith(f"gs://{BUCKET}/")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensors_round_trip_with_metadata(store_uri, dtype):
    store = Store(store_uri)
    tensors = {"latents": torch.randn(1, 4, 8, 8).to(dtype)}
    store.write_tensors("latents/x.safetensors", tensors, "k1", {"seed": 1})
    loaded = store.read_tensors("latents/x.safetensors", "k1")
    assert loaded["latents"].dtype == dtype and torch.equal(loaded["latents"], tensors["latents"])
    assert json.loads(store.read_metadata("latents/x.safetensors")["stagediff.inputs"]) == {"seed": 1}


def test_corrupt_object_is_detected_and_recomputed(tiny_sdxl, store_uri):
    request = Request(model=str(tiny_sdxl), prompts=["a red cat"], seeds=[0], steps=2, store=store_uri)
    run_all_stages(request)
    item = make_plan(request).items[0]
    store = make_plan(request).store
    store.fs.pipe_file(store.path(item.latents_path), store.read_bytes(item.latents_path)[:200])
    assert not store.has_valid_tensors(item.latents_path, item.latents_key)
    results = run_all_stages(request)
    assert results["denoise"].computed == 1
    store.read_tensors(item.latents_path, item.latents_key)


WRITER = """
import sys, torch
from stagediff.store import Store
uri, value, rounds = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
store = Store(uri)
for _ in range(rounds):
    store.write_tensors("latents/shared.safetensors", {"latents": torch.full((256, 1024), value)}, "k", {"same": "key"})
"""


def test_concurrent_writers_of_different_bytes_never_show_a_reader_a_mix(store_uri, emulator):
    """Two processes publish different bytes under one key again and again while a reader reads: every
    read is one writer's whole artifact (uploads are atomic), never a mix, never a checksum failure."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    Store(store_uri).write_tensors("latents/shared.safetensors", {"latents": torch.full((256, 1024), 1.0)}, "k", {"same": "key"})
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, store_uri, str(value), "6"], env=env) for value in (1.0, 2.0)]
    store = Store(store_uri)
    while any(writer.poll() is None for writer in writers):
        latents = store.read_tensors("latents/shared.safetensors", "k")["latents"]
        values = set(latents.unique().tolist())
        assert len(values) == 1 and values <= {1.0, 2.0}, values
    assert [writer.wait() for writer in writers] == [0, 0]
    assert store.read_tensors("latents/shared.safetensors", "k")["latents"].unique().tolist()[0] in (1.0, 2.0)
    assert len(generations(store_uri)) == 1


def test_a_mirrored_object_leading_outside_the_model_folder_is_refused(tiny_sdxl, emulator, tmp_path, monkeypatch):
    monkeypatch.setenv(gcs.MODEL_CACHE_VARIABLE, str(tmp_path / "cache"))
    fs = gcs.filesystem()
    fs.put(str(tiny_sdxl), f"{BUCKET}/models/escaping", recursive=True)
    fs.pipe_file(f"{BUCKET}/models/escaping/../../escaped.txt", b"written outside the cache")
    assert f"{BUCKET}/models/escaping/../../escaped.txt" in fs.find(f"{BUCKET}/models/escaping")
    with pytest.raises(StagediffError, match="leads outside the model folder"):
        gcs.mirror_folder(f"gs://{BUCKET}/models/escaping")
    assert not list(tmp_path.rglob("escaped.txt"))


def test_missing_bucket_fails_fast_naming_it(emulator):
    start = time.monotonic()
    with pytest.raises(StagediffError, match="bucket 'no-such-bucket' does not exist") as error:
        Store("gs://no-such-bucket/runs").check_writable()
    assert time.monotonic() - start < 10
    assert "\n" not in str(error.value)


def test_generation_completes_through_503s_and_a_dropped_connection(tiny_sdxl, emulator, monkeypatch):
    proxy = FaultyProxy(emulator.port, failures=3)
    monkeypatch.setenv(gcs.EMULATOR_VARIABLE, proxy.url)
    try:
        request = Request(model=str(tiny_sdxl), prompts=["a red cat"], seeds=[0], steps=2, store=f"gs://{BUCKET}/faulty")
        results = run_all_stages(request)
    finally:
        proxy.stop()
    assert results["decode"].computed == 1
    assert proxy.remaining_503 == 0 and not proxy.drop_next


def test_gs_model_is_mirrored_once_and_loads(tiny_sdxl, emulator, tmp_path, monkeypatch):
    monkeypatch.setenv(gcs.MODEL_CACHE_VARIABLE, str(tmp_path / "cache"))
    fs = gcs.filesystem()
    fs.put(str(tiny_sdxl), f"{BUCKET}/models/tiny-sdxl", recursive=True)
    uri = f"gs://{BUCKET}/models/tiny-sdxl"

    first = gcs.mirror_folder(uri)
    assert first.downloaded > 5 and (first.folder / "model_index.json").exists()
    assert gcs.mirror_folder(uri).downloaded == 0
    model = open_model(uri)
    assert model.family.name == "sdxl" and model.folder == first.folder
    results = run_all_stages(Request(model=uri, prompts=["a cat"], seeds=[0], steps=2, store=str(tmp_path / "store")))
    assert results["decode"].computed == 1


def test_cli_generate_with_a_gs_store(tiny_sdxl, emulator, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    uri = f"gs://{BUCKET}/cli"
    process = subprocess.run(
        [sys.executable, "-m", "stagediff.cli", "generate", "--model", str(tiny_sdxl), "--prompt", "a cat",
         "--seed", "0", "--seed", "1", "--steps", "2", "--store", uri, "--run-name", "cli"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert process.returncode == 0, process.stderr[-2000:]
    manifest = json.loads(gcs.filesystem().cat_file(f"{BUCKET}/cli/runs/cli/manifest.json"))
    assert [item["media"].startswith(f"{uri}/media/") for item in manifest["items"]] == [True, True]


def test_a_gs_model_mirror_follows_the_bucket_and_two_histories_give_the_same_keys(tiny_sdxl, emulator, tmp_path,
                                                                                    monkeypatch):
    """A file removed from the bucket is removed from the mirror: a machine that mirrored the folder
    while it held the file and one that mirrors it now plan the same keys."""
    fs = gcs.filesystem()
    remote = f"{BUCKET}/models/following"
    fs.put(str(tiny_sdxl), remote, recursive=True)
    fs.pipe_file(f"{remote}/unet/extra-notes.json", b'{"removed": "later"}')
    uri = f"gs://{remote}"

    monkeypatch.setenv(gcs.MODEL_CACHE_VARIABLE, str(tmp_path / "machine-a"))
    old = gcs.mirror_folder(uri)
    assert (old.folder / "unet/extra-notes.json").exists()
    fs.rm_file(f"{remote}/unet/extra-notes.json")
    request = Request(model=uri, prompts=["a cat"], seeds=[0], steps=2, store=str(tmp_path / "store"))
    followed = gcs.mirror_folder(uri)
    assert not (followed.folder / "unet/extra-notes.json").exists()
    assert "unet/extra-notes.json" not in json.loads((followed.folder / gcs.MIRROR_INDEX).read_text())
    keys_a = [item.latents_key for item in make_plan(request).items]

    monkeypatch.setenv(gcs.MODEL_CACHE_VARIABLE, str(tmp_path / "machine-b"))
    keys_b = [item.latents_key for item in make_plan(request).items]
    assert keys_a == keys_b


def test_a_mirror_index_left_half_written_is_no_failure(tiny_sdxl, emulator, tmp_path, monkeypatch):
    """The index is replaced atomically; one a killed process left torn (older versions wrote it in place)
    makes the next mirror compare every file again instead of failing."""
    monkeypatch.setenv(gcs.MODEL_CACHE_VARIABLE, str(tmp_path / "cache"))
    fs = gcs.filesystem()
    fs.put(str(tiny_sdxl), f"{BUCKET}/models/torn-index", recursive=True)
    uri = f"gs://{BUCKET}/models/torn-index"
    mirror = gcs.mirror_folder(uri)
    index = mirror.folder / gcs.MIRROR_INDEX
    index.write_text(index.read_text()[:40])
    assert gcs.mirror_folder(uri).downloaded > 0
    json.loads(index.read_text())
    assert [p.name for p in mirror.folder.iterdir() if p.name.endswith(".partial")] == []


def test_a_half_finished_chunk_on_a_bucket_downloads_only_what_it_consumes(tiny_sdxl, emulator, store_uri, monkeypatch):
    """Decode with one media file missing: the stages decide from listings (the inventory), so the run
    downloads that item's latents and nothing of the finished items."""
    request = Request(model=str(tiny_sdxl), prompts=["a cat"], seeds=[0, 1, 2], steps=2, store=store_uri)
    run_all_stages(request)
    plan = make_plan(request)
    missing = plan.items[1]
    gcs.filesystem().rm_file(plan.store.path(missing.media_path))
    proxy = FaultyProxy(emulator.port, failures=0)
    monkeypatch.setenv(gcs.EMULATOR_VARIABLE, proxy.url)
    try:
        results = run_all_stages(request)
    finally:
        proxy.stop()
    assert {stage: result.computed for stage, result in results.items()} == {"encode": 0, "denoise": 0, "decode": 1}
    downloads = [path for method, path, _ in proxy.log if method == "GET" and "alt=media" in path]
    assert len(downloads) == 1 and missing.latents_key in downloads[0], downloads


def test_gc_on_a_bucket_keeps_what_an_unfinished_run_declares(tiny_sdxl, emulator, store_uri, capsys):
    from stagediff.cli import main
    from stagediff.run_records import declared_run, plan_paths

    request = Request(model=str(tiny_sdxl), prompts=["a cat"], seeds=[0], steps=2, store=store_uri)
    plan = make_plan(request)
    with declared_run(plan.store, "unfinished", plan_paths(plan)):
        run_all_stages(request)
    stray = Request(model=str(tiny_sdxl), prompts=["a dog"], seeds=[0], steps=2, store=store_uri)
    run_all_stages(stray)  # declared by no run
    assert main(["gc", store_uri, "--unreferenced", "--older-than", "0", "--delete"]) == 0
    fs = gcs.filesystem()
    assert all(fs.exists(plan.store.path(path)) for path in plan_paths(plan))
    assert not any(fs.exists(plan.store.path(path)) for path in plan_paths(make_plan(stray)))
