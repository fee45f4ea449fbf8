"""Deciding what is left from listings and headers: a no-op rerun reads no artifact body, yet a truncated
file is caught; progress counts what the store already holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from gcs_emulator import BUCKET, FaultyProxy
from helpers import run_all_stages
from stagediff import gcs
from stagediff.cli import main
from stagediff.inventory import CORRUPT, DONE, MISSING, STALE, plan_state
from stagediff.plan import make_plan
from stagediff.request import Request


def _request(model, store, **changes) -> Request:
    return Request(**{"model": str(model), "prompts": ["a red cat", "a blue dog"], "seeds": [0, 1], "steps": 2,
                      "store": str(store), **changes})


@pytest.fixture(scope="module")
def finished_store(tiny_sdxl, tmp_path_factory) -> Path:
    """A local store holding every artifact of `_request`, built once."""
    store = tmp_path_factory.mktemp("finished")
    run_all_stages(_request(tiny_sdxl, store))
    return store


def copy_of(store: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(store, tmp_path / "store"))


def test_a_damaged_body_behind_an_intact_header_is_not_read_when_planning(tiny_sdxl, finished_store, tmp_path):
    """Planning reads headers only: every byte after them may be anything, the plan still says done
    (`stagediff verify` and the consuming stage read bodies)."""
    store = copy_of(finished_store, tmp_path)
    plan = make_plan(_request(tiny_sdxl, store))
    for item in plan.items:
        for path in (store / item.latents_path,):
            data = bytearray(path.read_bytes())
            data[-64:] = b"\x00" * 64
            path.write_bytes(bytes(data))
    state = plan_state(plan)
    assert set(state.latents.values()) == {DONE} and state.missing_stages == []


def test_truncated_and_stale_artifacts_are_caught_without_reading_bodies(tiny_sdxl, finished_store, tmp_path):
    store = copy_of(finished_store, tmp_path)
    plan = make_plan(_request(tiny_sdxl, store))
    latents = store / plan.items[0].latents_path
    latents.write_bytes(latents.read_bytes()[:-10])
    media = store / plan.items[1].media_path
    media.write_bytes(media.read_bytes()[:-20])
    stale = plan.items[2]
    tensors = plan.store.read_tensors(stale.latents_path, stale.latents_key)
    plan.store.write_tensors(stale.latents_path, {"latents": tensors["latents"] * 2}, stale.latents_key, stale.latents_inputs)
    (store / plan.embeddings[1].path).unlink()

    state = plan_state(plan)
    assert state.latents[plan.items[0].latents_path] == CORRUPT
    assert state.media[plan.items[1].media_path] == CORRUPT
    assert state.media[stale.media_path] == STALE
    assert state.embeddings[plan.embeddings[1].path] == MISSING
    assert state.done_items == 1 and state.missing_stages == ["encode", "denoise", "decode"]


def test_a_no_op_rerun_on_a_bucket_reads_no_artifact_body(tiny_sdxl, emulator, tmp_path, monkeypatch, capsys):
    """Counted at the wire: the rerun lists folders (one paged request each) and writes its manifest and
    contact sheet; it downloads no embeddings, latents or media."""
    store = f"gs://{BUCKET}/no-op"
    args = ["generate", "--model", str(tiny_sdxl), "--prompt", "a red cat", "--prompt", "a blue dog",
            "--seeds", "0-2", "--steps", "2", "--store", store, "--run-name", "first"]
    assert main(args) == 0
    proxy = FaultyProxy(emulator.port, failures=0)
    monkeypatch.setenv(gcs.EMULATOR_VARIABLE, proxy.url)
    try:
        assert main([*args[:-1], "again"]) == 0
    finally:
        proxy.stop()
    downloads = [path for method, path, _ in proxy.log if method == "GET" and "alt=media" in path]
    assert downloads == [], downloads
    listings = [path for method, path, _ in proxy.log if method == "GET" and "/o?" in path]
    # One listing per artifact folder, one more of media/ for the versions the contact sheet shows, and one
    # of runs/ that finds the first run's contact sheet of the same media (copied server side, not drawn
    # again from them); the run record is written at the start and at the end (two uploads).
    assert 0 < len(listings) <= 5 and len(proxy.log) <= 13, proxy.log
    assert "again/manifest.json" in capsys.readouterr().out
