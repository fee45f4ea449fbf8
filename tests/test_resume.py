"""Resume and reuse: the store, not luck, decides what is computed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from helpers import garble_body, run_all_stages, snapshot
from stagediff import stages
from stagediff.cli import main
from stagediff.errors import CorruptInput
from stagediff.inventory import plan_state
from stagediff.plan import make_plan
from stagediff.request import Request


def _request(model, store, seeds=(0, 1), prompts=("a red cat", "a blue dog")):
    return Request(model=str(model), prompts=list(prompts), seeds=list(seeds), steps=2, store=str(store))


def computed(results) -> dict[str, int]:
    return {stage: result.computed for stage, result in results.items()}


def test_one_prompt_many_seeds_encodes_once(tiny_sdxl, tmp_path):
    results = run_all_stages(_request(tiny_sdxl, tmp_path, seeds=(0, 1, 2), prompts=("a red cat",)))
    assert computed(results) == {"encode": 1, "denoise": 3, "decode": 3}
    assert len(list((tmp_path / "embeddings/sdxl").iterdir())) == 1


def test_rerun_reuses_every_artifact(tiny_sdxl, tmp_path):
    request = _request(tiny_sdxl, tmp_path)
    run_all_stages(request)
    before = snapshot(tmp_path)
    results = run_all_stages(request)
    assert computed(results) == {"encode": 0, "denoise": 0, "decode": 0}
    assert all(result.load_seconds == 0 for result in results.values())
    assert snapshot(tmp_path) == before


def test_deleting_one_latents_file_recomputes_only_those_latents(tiny_sdxl, tmp_path):
    """The recomputed latents are the same bytes (one item per call, as they were made), so the media decoded
    from them stays valid."""
    request = _request(tiny_sdxl, tmp_path).replace(batch_size=1)
    run_all_stages(request)
    victim = make_plan(request).items[2]
    Path(tmp_path, victim.latents_path).unlink()
    before = snapshot(tmp_path)

    results = run_all_stages(request)
    assert computed(results) == {"encode": 0, "denoise": 1, "decode": 0}
    changed = {path for path, mtime in snapshot(tmp_path).items() if before.get(path) != mtime}
    assert changed == {victim.latents_path}


def test_media_decoded_from_other_latents_is_stale_and_decoded_again(tiny_sdxl, tmp_path):
    """Latents rewritten with other values (another backend, another machine) under the same key make
    the media decoded from the old ones stale: decode redoes exactly that item, and nothing is deleted."""
    request = _request(tiny_sdxl, tmp_path)
    run_all_stages(request)
    plan = make_plan(request)
    victim = plan.items[1]
    latents = plan.store.read_tensors(victim.latents_path, victim.latents_key)["latents"]
    plan.store.write_tensors(victim.latents_path, {"latents": latents + 0.5}, victim.latents_key, victim.latents_inputs)
    before = snapshot(tmp_path)

    results = run_all_stages(request)
    assert computed(results) == {"encode": 0, "denoise": 0, "decode": 1}
    changed = {path for path, mtime in snapshot(tmp_path).items() if before.get(path) != mtime}
    assert changed == {victim.media_path}


def test_adding_a_seed_encodes_nothing_new(tiny_sdxl, tmp_path):
    run_all_stages(_request(tiny_sdxl, tmp_path, seeds=(0,)))
    results = run_all_stages(_request(tiny_sdxl, tmp_path, seeds=(0, 1)))
    assert computed(results) == {"encode": 0, "denoise": 2, "decode": 2}


def test_corrupt_latents_are_recomputed(tiny_sdxl, tmp_path):
    request = _request(tiny_sdxl, tmp_path, seeds=(0,), prompts=("a red cat",))
    run_all_stages(request)
    item = make_plan(request).items[0]
    path = Path(tmp_path, item.latents_path)
    path.write_bytes(path.read_bytes()[:100])

    results = run_all_stages(request)
    # The recomputed latents are the bytes the media was decoded from: it stays.
    assert computed(results) == {"encode": 0, "denoise": 1, "decode": 0}
    make_plan(request).store.read_tensors(item.latents_path, item.latents_key)


def test_denoise_never_deletes_media(tiny_sdxl, tmp_path):
    """Another run reading the manifest may be serving this file: recomputing latents leaves it."""
    request = _request(tiny_sdxl, tmp_path, seeds=(0,), prompts=("a red cat",))
    run_all_stages(request)
    plan = make_plan(request)
    item = plan.items[0]
    Path(tmp_path, item.latents_path).write_bytes(b"garbage")
    before = snapshot(tmp_path)[item.media_path]
    assert stages.denoise(plan).computed == 1
    assert snapshot(tmp_path)[item.media_path] == before


def test_a_run_that_writes_removes_what_killed_writers_left(tiny_sdxl, tmp_path):
    request = _request(tiny_sdxl, tmp_path, seeds=(0,), prompts=("a red cat",))
    item = make_plan(request).items[0]
    leftover = Path(tmp_path, item.latents_path).with_name(".tmp-0f0f-dead.safetensors")
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half written")
    os.utime(leftover, (time.time() - 7200,) * 2)
    run_all_stages(request)
    assert not leftover.exists()
    assert [p.name for p in leftover.parent.iterdir()] == [Path(item.latents_path).name]


def test_corrupt_latents_body_without_media_is_recomputed_not_a_decode_that_fails_forever(tiny_sdxl, tmp_path):
    """Planning trusts the intact header and schedules only decode; decode finds the body corrupt, notes
    it (deleting nothing), and the run has denoise write the latents again, then decodes them."""
    args = ["generate", "--model", str(tiny_sdxl), "--prompt", "a red cat", "--seeds", "0", "--steps", "2",
            "--store", str(tmp_path), "--run-name", "r"]
    assert main(args) == 0
    plan = make_plan(_request(tiny_sdxl, tmp_path, seeds=(0,), prompts=("a red cat",)))
    item = plan.items[0]
    latents, media = Path(tmp_path, item.latents_path), Path(tmp_path, item.media_path)
    garble_body(latents)
    garbled = latents.read_bytes()
    media.unlink()
    assert plan_state(plan).missing_stages == ["decode"]  # the header is all planning reads

    assert main(args) == 0
    assert latents.read_bytes() != garbled and media.exists()
    plan.store.read_tensors(item.latents_path, item.latents_key)  # whole again
    assert main(args) == 0  # and the next run finds everything done


def _one_item_with_corrupt_latents_and_no_media(model, store):
    """A finished one-item batch whose latents body is then garbled (header intact) and media deleted."""
    request = _request(model, store, seeds=(0,), prompts=("a red cat",))
    run_all_stages(request)
    plan = make_plan(request)
    item = plan.items[0]
    garble_body(Path(store, item.latents_path))
    Path(store, item.media_path).unlink()
    return request, plan, item


def test_a_decode_stage_alone_on_corrupt_latents_fails_once_and_denoise_then_rewrites_them(tiny_sdxl, tmp_path):
    request, plan, item = _one_item_with_corrupt_latents_and_no_media(tiny_sdxl, tmp_path)
    with pytest.raises(CorruptInput, match="corrupt"):
        stages.decode(plan)
    assert Path(tmp_path, item.latents_path).exists()  # decode deletes nothing
    assert computed(run_all_stages(request)) == {"encode": 0, "denoise": 1, "decode": 1}


def test_corrupt_embeddings_body_read_by_denoise_is_encoded_again(tiny_sdxl, tmp_path):
    args = ["generate", "--model", str(tiny_sdxl), "--prompt", "a red cat", "--seeds", "0", "--steps", "2",
            "--store", str(tmp_path), "--run-name", "r"]
    assert main(args) == 0
    plan = make_plan(_request(tiny_sdxl, tmp_path, seeds=(0,), prompts=("a red cat",)))
    item = plan.items[0]
    embeddings = Path(tmp_path, item.embedding.path)
    garble_body(embeddings)
    garbled = embeddings.read_bytes()
    Path(tmp_path, item.latents_path).unlink()
    Path(tmp_path, item.media_path).unlink()
    assert main(args) == 0
    assert embeddings.read_bytes() != garbled and Path(tmp_path, item.media_path).exists()
    plan.store.read_tensors(item.embedding.path, item.embedding.key)


def test_a_worker_whose_corrupt_input_reaches_the_run_as_another_failure_is_scheduled_again(tiny_sdxl, tmp_path):
    """Through Prefect a stage's failure arrives as "stage run ended Failed": the note the stage left in
    the store is what the run goes by."""
    from stagediff.scheduler import BatchRun, LocalExecutor

    request, plan, item = _one_item_with_corrupt_latents_and_no_media(tiny_sdxl, tmp_path)

    def remote_worker(unit):
        try:
            return stages.run_stage(unit.stage, plan, unit.keys)
        except Exception as error:
            raise RuntimeError(f"{unit.stage} run ended Failed: {error}") from None

    BatchRun(plan, LocalExecutor(remote_worker, overlap=False), "remote").run()
    plan.store.read_tensors(item.latents_path, item.latents_key)
    assert Path(tmp_path, item.media_path).exists()
