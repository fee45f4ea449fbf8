"""Model identity and loading: keys follow every byte the stages load, model_index.json settings,
Hugging Face blob hashes; safetensors only; model loads are safe in several threads at once."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from hub_emulator import HubEmulator
from stagediff import fingerprints, stages
from stagediff.errors import StagediffError
from stagediff.models import open_model
from stagediff.plan import make_plan
from stagediff.request import Request

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def sdxl_copy(tiny_sdxl, tmp_path, monkeypatch):
    """A private copy of the tiny SDXL (to edit) and a private digest cache."""
    monkeypatch.setenv(fingerprints.CACHE_VARIABLE, str(tmp_path / "digests"))
    return Path(shutil.copytree(tiny_sdxl, tmp_path / "model"))


def keys(model: Path, store: Path) -> dict[str, str]:
    plan = make_plan(Request(model=str(model), prompts=["a red cat"], seeds=[0], store=str(store)))
    item = plan.items[0]
    return {"embeddings": item.embedding.key, "latents": item.latents_key, "media": item.media_key}


def test_a_byte_changed_in_the_middle_of_a_large_weight_file_changes_the_keys(sdxl_copy, tmp_path):
    """A fine-tune saved in place: same size, same first and last MiB, other weights."""
    weights = sdxl_copy / UNET_WEIGHTS
    assert weights.stat().st_size > 6 * 2**20
    before = keys(sdxl_copy, tmp_path / "store")
    with weights.open("r+b") as file:
        file.seek(weights.stat().st_size // 2)
        byte = file.read(1)
        file.seek(-1, os.SEEK_CUR)
        file.write(bytes([byte[0] ^ 0x01]))
    after = keys(sdxl_copy, tmp_path / "store")
    assert after["embeddings"] == before["embeddings"]  # the text encoders did not change
    assert after["latents"] != before["latents"] and after["media"] != before["media"]


def test_model_index_settings_are_part_of_the_embeddings_key(sdxl_copy, tmp_path):
    """SDXL's `force_zeros_for_empty_prompt` (model_index.json) changes the negative embeddings."""
    before = keys(sdxl_copy, tmp_path / "store")
    index_path = sdxl_copy / "model_index.json"
    index = json.loads(index_path.read_text())
    index["force_zeros_for_empty_prompt"] = not index.get("force_zeros_for_empty_prompt", True)
    index_path.write_text(json.dumps(index))
    assert keys(sdxl_copy, tmp_path / "store")["embeddings"] != before["embeddings"]


def test_file_digests_are_computed_once_and_again_when_the_file_changes(sdxl_copy, tmp_path):
    weights = sdxl_copy / UNET_WEIGHTS
    digest = fingerprints.file_digest(weights)
    (cached,) = [path for path in (tmp_path / "digests").iterdir() if path.read_text() == digest]
    fingerprints._memory.clear()
    cached.write_text("sha256:from-the-cache")  # a cached digest is trusted: the file is not read again
    assert fingerprints.file_digest(weights) == "sha256:from-the-cache"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1000))
    assert fingerprints.file_digest(weights) == digest  # another mtime: hashed again


def test_large_files_hash_every_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprints, "CHUNK_BYTES", 1024)
    monkeypatch.setenv(fingerprints.CACHE_VARIABLE, str(tmp_path / "digests"))
    data = bytearray(os.urandom(10_000))
    path = tmp_path / "weights.safetensors"
    path.write_bytes(data)
    first = fingerprints.file_digest(path)
    data[5000] ^= 1
    path.write_bytes(data)
    os.utime(path, ns=(0, 12345))
    assert fingerprints.file_digest(path) != first


def test_a_hugging_face_snapshot_is_identified_by_its_blob_names(tiny_sdxl, tmp_path, monkeypatch):
    """Snapshot files link to blobs named by their content hash: equal names, equal keys, nothing read."""
    monkeypatch.setenv(fingerprints.CACHE_VARIABLE, str(tmp_path / "digests"))
    repo = tmp_path / "hub" / "models--org--tiny-sdxl"
    snapshot = repo / "snapshots" / ("0" * 40)
    for source in tiny_sdxl.rglob("*"):
        if source.is_file():
            blob = repo / "blobs" / fingerprints._hash_file(source, source.stat().st_size).split(":")[1]
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, blob)
            link = snapshot / source.relative_to(tiny_sdxl)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    weights = snapshot / UNET_WEIGHTS
    assert fingerprints.file_digest(weights) == f"hf:{Path(os.readlink(weights)).name}"
    keys(snapshot, tmp_path / "store")
    assert not (tmp_path / "digests").exists()  # planning hashed no file


def test_a_component_with_only_pickled_weights_is_refused(sdxl_copy, tmp_path):
    (sdxl_copy / UNET_WEIGHTS).rename(sdxl_copy / "unet/diffusion_pytorch_model.bin")
    with pytest.raises(StagediffError, match="component 'unet' has weights only as .bin; stagediff loads "
                                             "safetensors weights only"):
        keys(sdxl_copy, tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_pickled_weights_beside_safetensors_are_in_no_key(sdxl_copy, tmp_path):
    before = keys(sdxl_copy, tmp_path / "store")
    (sdxl_copy / "unet/diffusion_pytorch_model.bin").write_bytes(b"never loaded")
    assert keys(sdxl_copy, tmp_path / "store") == before


def test_every_stage_loading_at_once_many_times_leaves_torch_unpatched(tiny_sdxl, tmp_path):
    """Loads run under process-wide patches of torch (accelerate's `init_empty_weights`): three stages
    loading in three threads at once must neither fail nor leave torch patched, and every weight is a
    real tensor equal to a load on its own."""
    originals = (torch.nn.Module.register_parameter, torch.nn.init.normal_)
    plan = make_plan(Request(model=str(tiny_sdxl), prompts=["a red cat"], seeds=[0], store=str(tmp_path)))
    errors = []

    def load(stage, barrier):
        barrier.wait()
        try:
            stages.stage_pipeline(plan, stage)
        except Exception as error:  # noqa: BLE001 - collected for the assertion
            errors.append(error)

    for _ in range(12):
        stages.release()
        barrier = threading.Barrier(3)
        threads = [threading.Thread(target=load, args=(stage, barrier)) for stage in (stages.ENCODE, stages.DENOISE, stages.DECODE)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert (torch.nn.Module.register_parameter, torch.nn.init.normal_) == originals
    unet = stages.stage_pipeline(plan, stages.DENOISE).unet
    stages.release()
    alone = stages.stage_pipeline(plan, stages.DENOISE).unet
    for (name, tensor), (_, expected) in zip(unet.state_dict().items(), alone.state_dict().items()):
        assert tensor.device.type == "cpu" and torch.equal(tensor, expected), name
    stages.release()


def test_a_model_saved_in_place_is_loaded_again_by_a_warm_stage(sdxl_copy, tmp_path):
    plan = make_plan(Request(model=str(sdxl_copy), prompts=["a red cat"], seeds=[0], store=str(tmp_path)))
    first = stages.stage_pipeline(plan, stages.DECODE)
    assert stages.stage_pipeline(make_plan(plan.request), stages.DECODE) is first
    config_path = sdxl_copy / "vae/config.json"
    config_path.write_text(config_path.read_text().replace("{", '{"note": "saved again",', 1))
    assert stages.stage_pipeline(make_plan(plan.request), stages.DECODE) is not first
    stages.release()


def test_open_model_names_the_family_and_revision(tiny_sdxl):
    model = open_model(str(tiny_sdxl))
    assert model.family.name == "sdxl" and model.revision is None


def test_each_stage_fetches_only_its_own_components_from_the_hub(tiny_sdxl, tmp_path):
    """A Hub model (served on loopback): planning downloads configs only, each stage process then
    downloads its components' safetensors and nothing else (never a pickled `.bin`), and all three
    agree on the keys (the encode worker's embeddings feed the denoise worker)."""
    repo = Path(shutil.copytree(tiny_sdxl, tmp_path / "repo"))
    (repo / "unet/diffusion_pytorch_model.bin").write_bytes(b"a pickle: never fetched")
    hub = HubEmulator({"org/tiny-sdxl": repo})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "HF_ENDPOINT": hub.url,
           "HF_HOME": str(tmp_path / "hf"), fingerprints.CACHE_VARIABLE: str(tmp_path / "digests")}
    fetched = {}
    try:
        for stage in ("encode", "denoise", "decode"):
            before = len(hub.downloads)
            process = subprocess.run(
                [sys.executable, "-m", "stagediff.cli", stage, "--model", "org/tiny-sdxl", "--prompt", "a red cat",
                 "--seed", "0", "--steps", "2", "--store", str(tmp_path / "store")],
                capture_output=True, text=True, env=env,
            )
            assert process.returncode == 0, process.stderr[-2000:]
            fetched[stage] = {path.removeprefix("org/tiny-sdxl/") for path in hub.downloads[before:]}
    finally:
        hub.stop()
    weights = {stage: {path.split("/")[0] for path in paths if path.endswith(".safetensors")} for stage, paths in fetched.items()}
    assert weights == {"encode": {"text_encoder", "text_encoder_2"}, "denoise": {"unet"}, "decode": {"vae"}}
    assert all(path.endswith(".json") for path in fetched["encode"] if "/" in path and path.split("/")[0] in ("unet", "vae"))
    assert not any(path.endswith(".bin") for paths in fetched.values() for path in paths)
    assert len(list((tmp_path / "store/media").glob("*.png"))) == 1


def test_a_same_size_same_mtime_rewrite_is_hashed_again(tmp_path, monkeypatch):
    """`cp -p` of other bytes, or a rewrite followed by `os.utime`: size, mtime and inode stay; the
    ctime moves, as git's index notices."""
    monkeypatch.setenv(fingerprints.CACHE_VARIABLE, str(tmp_path / "digests"))
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"a" * 4096)
    stat = path.stat()
    first = fingerprints.file_digest(path)
    time.sleep(0.01)
    with open(path, "r+b") as file:  # in place: the same inode
        file.write(b"b" * 4096)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns, path.stat().st_ino) == (
        stat.st_size, stat.st_mtime_ns, stat.st_ino)
    assert fingerprints.file_digest(path) != first


def test_links_into_a_hub_cache_from_elsewhere_claim_no_blob_identity(tmp_path, monkeypatch):
    """A folder of links into another model's blobs is hashed, not named by those blobs; the cache's
    own snapshot links are."""
    monkeypatch.setenv(fingerprints.CACHE_VARIABLE, str(tmp_path / "digests"))
    repo = tmp_path / "hub" / "models--org--real"
    blob = repo / "blobs" / ("a" * 64)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"not what the name says")
    inside = repo / "snapshots" / ("0" * 40) / "unet" / "w.safetensors"
    inside.parent.mkdir(parents=True)
    inside.symlink_to(blob)
    elsewhere = tmp_path / "my-model" / "unet" / "w.safetensors"
    elsewhere.parent.mkdir(parents=True)
    elsewhere.symlink_to(blob)
    other_repo = tmp_path / "hub" / "models--org--other" / "snapshots" / ("1" * 40) / "w.safetensors"
    other_repo.parent.mkdir(parents=True)
    other_repo.symlink_to(blob)
    assert fingerprints.file_digest(inside) == "hf:" + "a" * 64
    hashed = "sha256:" + hashlib.sha256(b"not what the name says").hexdigest()
    assert fingerprints.file_digest(elsewhere) == hashed
    assert fingerprints.file_digest(other_repo) == hashed


class _RefusingHub:
    """A Hub that answers every request with 429 Too Many Requests."""

    def __init__(self):
        import http.server

        from gcs_emulator import free_port

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _refuse(self):
                self.send_response(429)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD = _refuse

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def _hub_env(tmp_path, endpoint):
    return {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "HF_ENDPOINT": endpoint,
            "HF_HOME": str(tmp_path / "hf"), fingerprints.CACHE_VARIABLE: str(tmp_path / "digests"),
            "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}


def _plan_in_process(env, model, store):
    """`stagediff status` in a fresh process (the Hub's endpoint is read when huggingface_hub is imported)."""
    return subprocess.run([sys.executable, "-m", "stagediff.cli", "status", "--model", model, "--prompt", "a red cat",
                           "--seed", "0", "--steps", "2", "--store", str(store)], capture_output=True, text=True, env=env)


def test_a_hub_model_is_planned_at_one_commit_that_every_stage_receives(tiny_sdxl, tmp_path):
    """`org/name` is resolved once, when planned: the plan's request (what units and remote workers get)
    names `org/name@<commit>`, the manifest records it, and the pinned request plans the same keys."""
    from hub_emulator import COMMIT

    hub = HubEmulator({"org/tiny-sdxl": tiny_sdxl})
    script = (
        "import json, sys\n"
        "from stagediff.plan import make_plan\nfrom stagediff.request import Request\n"
        "from stagediff.manifest import manifest_of\n"
        "plan = make_plan(Request(model=sys.argv[1], prompts=['a red cat'], seeds=[0], steps=2, store=sys.argv[2]))\n"
        "print(json.dumps([plan.request.model, manifest_of(plan)['model'], [i.latents_key for i in plan.items]]))\n"
    )
    env = _hub_env(tmp_path, hub.url)
    try:
        answers = [json.loads(subprocess.run([sys.executable, "-c", script, model, str(tmp_path / "store")],
                                             capture_output=True, text=True, env=env, check=True).stdout)
                   for model in ("org/tiny-sdxl", f"org/tiny-sdxl@{COMMIT}")]
    finally:
        hub.stop()
    pinned = f"org/tiny-sdxl@{COMMIT}"
    assert answers[0][:2] == [pinned, pinned] and answers[1][:2] == [pinned, pinned]
    assert answers[0][2] == answers[1][2]


def test_a_hub_scorer_is_pinned_at_one_commit_that_every_unit_receives(tiny_sdxl, tiny_clip, tmp_path):
    """`--score clip:org/name` is resolved once, when planned, as the model is: the plan's request names
    `clip:org/name@<commit>`, the scorer keeps its name, and the pinned request plans the same score keys."""
    from hub_emulator import COMMIT

    hub = HubEmulator({"org/tiny-clip": tiny_clip})
    script = (
        "import json, sys\n"
        "from stagediff.plan import make_plan\nfrom stagediff.request import Request\n"
        "from stagediff.scoring import score_tasks\n"
        "plan = make_plan(Request(model=sys.argv[1], prompts=['a red cat'], seeds=[0], steps=2, store=sys.argv[2],\n"
        "                         scores=[sys.argv[3]]))\n"
        "print(json.dumps([list(plan.request.scores), [s.name for s in plan.scorers], [t.key for t in score_tasks(plan)]]))\n"
    )
    env = _hub_env(tmp_path, hub.url)
    try:
        answers = [json.loads(subprocess.run([sys.executable, "-c", script, str(tiny_sdxl), str(tmp_path / "store"), score],
                                             capture_output=True, text=True, env=env, check=True).stdout)
                   for score in ("clip:org/tiny-clip", f"clip:org/tiny-clip@{COMMIT}")]
    finally:
        hub.stop()
    pinned = [f"clip:org/tiny-clip@{COMMIT}"]
    assert answers[0][:2] == answers[1][:2] == [pinned, ["clip:org/tiny-clip"]]
    assert answers[0][2] == answers[1][2]


def test_a_hub_that_refuses_requests_fails_planning_with_one_line(tiny_sdxl, tmp_path):
    """Before: the listing fell back silently to whatever files the local cache held. Now a Hub that
    answers 429 is a one-line error, even with the model's configs cached from an earlier run."""
    hub = HubEmulator({"org/tiny-sdxl": tiny_sdxl})
    try:
        assert _plan_in_process(_hub_env(tmp_path, hub.url), "org/tiny-sdxl", tmp_path / "store").returncode == 0
    finally:
        hub.stop()
    shutil.rmtree(tmp_path / "digests")  # the commit's listing is not cached on this machine
    refusing = _RefusingHub()
    try:
        process = _plan_in_process(_hub_env(tmp_path, refusing.url), "org/tiny-sdxl", tmp_path / "store")
    finally:
        refusing.stop()
    assert process.returncode == 2, process.stdout + process.stderr[-2000:]
    # (huggingface_hub logs its own retries of the 429 before giving up.)
    errors = [line for line in process.stderr.splitlines() if line.startswith("stagediff: error:")]
    assert len(errors) == 1 and process.stderr.strip().endswith(errors[0]), process.stderr[-2000:]
    assert "org/tiny-sdxl" in errors[0] and "Hugging Face Hub" in errors[0] and "429" in errors[0], errors
