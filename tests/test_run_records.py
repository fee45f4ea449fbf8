"""Run records: a run declares its artifacts before it uses them, and `gc` never deletes live or
unfinished work; `verify --repair` checks again before it removes."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from helpers import run_all_stages
from stagediff import run_records, stages
from stagediff.cli import main
from stagediff.housekeeping import collect, garbage, verify
from stagediff.plan import make_plan
from stagediff.request import Request
from stagediff.run_records import RECORD_PROTECTS_SECONDS, declared_run, plan_paths, record_path
from stagediff.scheduler import BatchRun, LocalExecutor
from stagediff.store import Store

TWO_HOURS = 2 * 3600


def _request(model, store, prompts=("a red cat",), seeds=(0, 1)):
    return Request(model=str(model), prompts=list(prompts), seeds=list(seeds), steps=2, store=str(store))


def _age(store: Path, seconds: float) -> None:
    """Make every artifact of the store `seconds` old."""
    for folder in ("embeddings", "latents", "media"):
        for path in (store / folder).rglob("*"):
            if path.is_file():
                os.utime(path, (time.time() - seconds,) * 2)


def _artifacts(store: Path) -> set[str]:
    return {str(p.relative_to(store)) for folder in ("embeddings", "latents", "media")
            for p in (store / folder).rglob("*") if p.is_file()}


def test_gc_never_deletes_the_work_of_a_running_batch(tiny_sdxl, tmp_path):
    """The reproduction: a sweep's artifacts are two hours old, its manifest not written yet; gc
    --unreferenced --delete ran and deleted all 5. The run's record declares them: all stay."""
    store = tmp_path / "store"
    plan = make_plan(_request(tiny_sdxl, store))
    paused, release = threading.Event(), threading.Event()
    decoded = []

    def run_unit(unit):
        result = stages.run_stage(unit.stage, plan, unit.keys)
        decoded.extend(unit.keys if unit.stage == "decode" else ())
        if len(decoded) == len(plan.items):  # the batch's work is done, its manifest not yet written
            paused.set()
            assert release.wait(120)
        return result

    batch = threading.Thread(target=lambda: BatchRun(plan, LocalExecutor(run_unit, overlap=False), "sweep").run())
    batch.start()
    try:
        assert paused.wait(300)
        assert not (store / "runs/sweep/manifest.json").exists()
        made = _artifacts(store)
        assert len(made) == 5  # 1 embeddings, 2 latents, 2 media
        _age(store, TWO_HOURS)
        assert main(["gc", str(store), "--unreferenced", "--delete"]) == 0
        assert _artifacts(store) == made
    finally:
        release.set()
        batch.join()
    assert (store / "runs/sweep/manifest.json").exists()


def test_a_run_that_died_keeps_its_work_until_its_record_is_stale(tiny_sdxl, tmp_path, capsys):
    store = tmp_path / "store"
    request = _request(tiny_sdxl, store)
    plan = make_plan(request)
    with declared_run(plan.store, "died", plan_paths(plan)):
        run_all_stages(request)  # ... and then the process died: a record, no manifest
    _age(store, TWO_HOURS)
    made = _artifacts(store)
    assert main(["gc", str(store), "--unreferenced", "--delete"]) == 0
    assert _artifacts(store) == made

    record = store / record_path("died")
    document = json.loads(record.read_text())
    document["heartbeat"] = time.time() - RECORD_PROTECTS_SECONDS - 60
    record.write_text(json.dumps(document))
    assert main(["gc", str(store), "--unreferenced", "--delete"]) == 0
    assert _artifacts(store) == set()


def test_gc_checks_declarations_again_right_before_each_delete(tiny_sdxl, tmp_path):
    store = tmp_path / "store"
    request = _request(tiny_sdxl, store)
    run_all_stages(request)
    _age(store, TWO_HOURS)
    report = garbage(Store(str(store)), unreferenced=True)
    assert set(report.unreferenced) == _artifacts(store)
    # A run starts between gc's listing and its deletes, and declares these artifacts (it reuses them).
    plan = make_plan(request)
    with declared_run(plan.store, "late-comer", plan_paths(plan)):
        collect(Store(str(store)), report)
    assert report.unreferenced == [] and set(report.kept) == set(plan_paths(plan))
    assert _artifacts(store) == set(plan_paths(plan))


def test_gc_keeps_an_artifact_written_again_since_it_was_listed(tiny_sdxl, tmp_path):
    store = tmp_path / "store"
    run_all_stages(_request(tiny_sdxl, store))
    _age(store, TWO_HOURS)
    report = garbage(Store(str(store)), unreferenced=True)
    rewritten = next(path for path in report.unreferenced if path.startswith("latents/"))
    os.utime(store / rewritten)  # written again just now
    collect(Store(str(store)), report)
    assert (store / rewritten).exists() and report.kept == [rewritten]


def test_an_unreadable_run_record_stops_gc(tiny_sdxl, tmp_path, capsys):
    store = tmp_path / "store"
    run_all_stages(_request(tiny_sdxl, store))
    _age(store, TWO_HOURS)
    (store / "runs/broken").mkdir(parents=True)
    (store / "runs/broken/record.json").write_text("{not json")
    made = _artifacts(store)
    assert main(["gc", str(store), "--unreferenced", "--delete"]) == 2
    error = capsys.readouterr().err.strip()
    assert "runs/broken/record.json" in error and "\n" not in error
    assert _artifacts(store) == made


def test_a_running_record_keeps_its_heartbeat_fresh(tmp_path):
    store = Store(str(tmp_path))
    with declared_run(store, "beating", ["latents/sdxl/k.safetensors"], heartbeat_seconds=0.05):
        first = json.loads((tmp_path / record_path("beating")).read_text())
        time.sleep(0.3)
        later = json.loads((tmp_path / record_path("beating")).read_text())
        assert later["heartbeat"] > first["heartbeat"] and later["ended"] is None
    ended = json.loads((tmp_path / record_path("beating")).read_text())
    assert ended["ended"] is not None and ended["paths"] == ["latents/sdxl/k.safetensors"]


def test_a_single_stage_command_declares_its_run(tiny_sdxl, tmp_path):
    store = tmp_path / "store"
    args = ["--model", str(tiny_sdxl), "--prompt", "a red cat", "--seeds", "0", "--steps", "2", "--store", str(store)]
    assert main(["encode", *args, "--run-name", "enc"]) == 0
    record = json.loads((store / record_path("enc")).read_text())
    plan = make_plan(_request(tiny_sdxl, store, seeds=(0,)))
    assert record["paths"] == plan_paths(plan) and record["ended"] is not None
    _age(store, TWO_HOURS)
    assert main(["gc", str(store), "--unreferenced", "--delete"]) == 0
    assert (store / plan.embeddings[0].path).exists()  # kept for the denoise stage to come


def test_verify_repair_checks_again_before_removing(tiny_sdxl, tmp_path):
    store = tmp_path / "store"
    run_all_stages(_request(tiny_sdxl, store, seeds=(0,)))
    latents = next((store / "latents").rglob("*.safetensors"))
    good = latents.read_bytes()
    latents.write_bytes(good[:-16])
    relative = str(latents.relative_to(store))

    def rewritten_by_a_stage(path):
        if path == relative:  # the denoise stage writes it again between verify's read and its repair
            latents.write_bytes(good)

    report = verify(Store(str(store)), repair=True, on_checked=rewritten_by_a_stage)
    assert report.corrupt == [relative] and report.removed == []
    assert latents.read_bytes() == good


@pytest.mark.parametrize("name", ["../escape", "a/b"])
def test_a_record_is_confined_to_a_run_folder(tmp_path, name):
    from stagediff.errors import StagediffError

    with pytest.raises(StagediffError, match="--run-name"):
        run_records.RunRecord(Store(str(tmp_path)), name, [])
