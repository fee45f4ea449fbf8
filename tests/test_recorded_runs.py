"""Runs recorded on the shared real server (`prefect_stack`): `stagediff generate` with a Prefect API
configured runs as the generate flow, and the sweep flow's prompt file and seed range render the items
of the same CLI flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from flows.sweep import sweep
from helpers import latest_run
from stagediff import cli
from stagediff.manifest import artifact_path

ROOT = Path(__file__).resolve().parents[1]
SIZE = ["--steps", "2", "--height", "64", "--width", "64"]


def manifest_items(store: Path, run_name: str) -> list[tuple]:
    manifest = json.loads((store / "runs" / run_name / "manifest.json").read_text())
    return [(item["prompt"], item["negative_prompt"], item["seed"], artifact_path(item["media"]))
            for item in manifest["items"]]


def test_cli_generate_is_recorded_as_the_generate_flow_on_a_configured_api(prefect_stack, prefect_client, tiny_sdxl,
                                                                            tmp_path):
    command = [sys.executable, "-m", "flows.cli", "generate", "--model", str(tiny_sdxl), "--prompt", "a red cat",
               "--seed", "0", *SIZE, "--store", str(tmp_path), "--run-name", "recorded"]
    env = {**os.environ, "PREFECT_API_URL": prefect_stack.env["PREFECT_API_URL"]}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]

    run = latest_run(prefect_client, "generate")
    assert run.state.is_completed()
    assert run.parameters["run_name"] == "recorded" and run.parameters["prompts"] == ["a red cat"]
    assert [seed for _, _, seed, _ in manifest_items(tmp_path, "recorded")] == [0]
    assert all((tmp_path / media).is_file() for *_, media in manifest_items(tmp_path, "recorded"))


def test_a_sweep_over_a_prompt_file_renders_the_items_of_the_same_cli_flags(prefect_client, tiny_sdxl, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red cat"}\n{"prompt": "a blue dog", "negative_prompt": "blurry"}\n')
    sweep(model=str(tiny_sdxl), prompt_file=str(prompts), seed_start=3, seed_count=2, steps=2, height=64, width=64,
          store=str(tmp_path / "sweep"), run_name="nightly", dispatch="in-process")
    assert cli.main(["generate", "--model", str(tiny_sdxl), "--prompt-file", str(prompts), "--seeds", "3-4", *SIZE,
                     "--store", str(tmp_path / "cli"), "--run-name", "by-hand"]) == 0

    swept = manifest_items(tmp_path / "sweep", "nightly")
    assert swept == manifest_items(tmp_path / "cli", "by-hand")
    assert [(prompt, negative, seed) for prompt, negative, seed, _ in swept] == [
        ("a red cat", None, 3), ("a red cat", None, 4), ("a blue dog", "blurry", 3), ("a blue dog", "blurry", 4)]


def test_the_cli_and_the_warm_flow_make_the_same_artifacts_and_manifest(prefect_client, tiny_sdxl, tmp_path):
    from PIL import Image
    import numpy as np

    from flows.generate import generate

    options = dict(prompts=["a red cat", "a blue dog"], seeds=[0, 1, 2], steps=2, height=64, width=64)
    assert cli.main(["generate", "--model", str(tiny_sdxl), "--prompt", "a red cat", "--prompt", "a blue dog",
                     "--seeds", "0-2", *SIZE, "--store", str(tmp_path / "cli"), "--run-name", "same"]) == 0
    generate(model=str(tiny_sdxl), **options, store=str(tmp_path / "flow"), run_name="same", dispatch="warm")

    def artifacts(store: Path) -> set[str]:
        return {str(path.relative_to(store)) for path in store.rglob("*") if path.is_file()}

    def manifest(store: Path) -> dict:
        return json.loads((store / "runs/same/manifest.json").read_text().replace(str(store), "STORE"))

    cli_store, flow_store = tmp_path / "cli", tmp_path / "flow"
    assert artifacts(cli_store) == artifacts(flow_store)
    assert manifest(cli_store) == manifest(flow_store)
    for media in cli_store.glob("media/*.png"):
        ours, theirs = (np.asarray(Image.open(store / "media" / media.name)).astype(int) for store in (cli_store, flow_store))
        assert np.abs(ours - theirs).max() <= 2
