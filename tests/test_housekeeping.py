"""`stagediff status`, `verify` and `gc` on a store with good, missing, truncated and garbled artifacts
and the leftovers of a killed writer."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from helpers import run_all_stages, snapshot
from stagediff.cli import LEFTOVER_AGE_SECONDS, main
from stagediff.plan import make_plan
from stagediff.request import Request
from stagediff.store import LEFTOVER_AGE_SECONDS as STORE_LEFTOVER_AGE

ARGS = ["--prompt", "a red cat", "--prompt", "a blue dog", "--seeds", "0-1", "--steps", "2"]


@pytest.fixture(scope="module")
def damaged(tiny_sdxl, tmp_path_factory):
    """A store after one run (manifest `first`) and a second one, then damaged: a missing media file, a
    truncated latents file, a garbled embeddings body (header intact), and an hour-old leftover."""
    store = tmp_path_factory.mktemp("damaged")
    assert main(["generate", "--model", str(tiny_sdxl), *ARGS, "--store", str(store), "--run-name", "first"]) == 0
    extra = Request(model=str(tiny_sdxl), prompts=["a green frog"], seeds=[5], steps=2, store=str(store))
    run_all_stages(extra)  # no manifest refers to these
    plan = make_plan(Request(model=str(tiny_sdxl), prompts=["a red cat", "a blue dog"], seeds=[0, 1], steps=2,
                             store=str(store)))
    paths = {
        "missing": store / plan.items[0].media_path,
        "truncated": store / plan.items[1].latents_path,
        "garbled": store / plan.embeddings[1].path,
        "leftover": store / "latents/sdxl/.tmp-0000-killed.safetensors",
        "unreferenced": [store / item.latents_path for item in make_plan(extra).items],
    }
    paths["missing"].unlink()
    paths["truncated"].write_bytes(paths["truncated"].read_bytes()[:-100])
    data = bytearray(paths["garbled"].read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])
    paths["garbled"].write_bytes(bytes(data))
    paths["leftover"].write_bytes(b"half written")
    os.utime(paths["leftover"], (time.time() - 2 * 3600,) * 2)
    return store, paths


def test_status_reports_each_stage_from_headers(tiny_sdxl, damaged, capsys):
    store, paths = damaged
    assert main(["status", "--model", str(tiny_sdxl), *ARGS, "--store", str(store)]) == 0
    lines = capsys.readouterr().out.splitlines()
    # The garbled body has an intact header: status does not read bodies (verify does).
    assert lines[:3] == ["encode   2 done", "denoise  1 corrupt, 3 done", "decode   2 done, 1 missing, 1 stale"]
    assert f"corrupt  {paths['truncated']}" in lines and f"missing  {paths['missing']}" in lines


def test_status_of_a_run_reads_its_manifest(damaged, capsys):
    store, _ = damaged
    assert main(["status", "--run", "first", "--store", str(store)]) == 0
    assert capsys.readouterr().out.splitlines()[:3] == [
        "encode   2 done", "denoise  1 corrupt, 3 done", "decode   2 done, 1 missing, 1 stale"]


def test_verify_reads_every_body_and_repair_removes_the_corrupt(damaged, tmp_path, capsys):
    store = Path(shutil.copytree(damaged[0], tmp_path / "store"))
    corrupt = {str(store / path.relative_to(damaged[0])) for path in (damaged[1]["truncated"], damaged[1]["garbled"])}
    assert main(["verify", str(store)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert {line.split()[1] for line in out if line.startswith("corrupt")} == corrupt
    assert out[-1] == "12 artifacts checked, 2 corrupt, 0 unreadable"
    assert all(Path(path).exists() for path in corrupt)
    assert main(["verify", str(store), "--repair"]) == 0
    assert not any(Path(path).exists() for path in corrupt)
    assert main(["verify", str(store)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "10 artifacts checked, 0 corrupt, 0 unreadable"


def test_gc_lists_without_deleting_then_deletes_when_asked(damaged, tmp_path, capsys):
    store = Path(shutil.copytree(damaged[0], tmp_path / "store"))
    leftover = store / damaged[1]["leftover"].relative_to(damaged[0])
    os.utime(leftover, (time.time() - 2 * 3600,) * 2)
    unreferenced = {store / path.relative_to(damaged[0]) for path in damaged[1]["unreferenced"]}
    before = snapshot(store)

    assert main(["gc", str(store)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"leftover     {leftover}",
                                                    "1 files found (run again with --delete to delete them)"]
    assert main(["gc", str(store), "--unreferenced", "--older-than", "0"]) == 0
    listed = {line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("unreferenced")}
    assert {str(path) for path in unreferenced} <= listed
    assert all(path.startswith(str(store / "embeddings")) or path.startswith(str(store / "latents"))
               or path.startswith(str(store / "media")) for path in listed)
    assert snapshot(store) == before  # a dry run deletes nothing

    assert main(["gc", str(store), "--unreferenced", "--older-than", "0", "--delete"]) == 0
    assert not leftover.exists() and not any(path.exists() for path in unreferenced)
    assert main(["status", "--run", "first", "--store", str(store)]) == 0  # what the run refers to stays
    assert "decode   2 done, 1 missing, 1 stale" in capsys.readouterr().out


def test_the_cli_repeats_the_store_leftover_age():
    assert LEFTOVER_AGE_SECONDS == STORE_LEFTOVER_AGE
