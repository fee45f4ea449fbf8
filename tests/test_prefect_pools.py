"""The ephemeral way to run stages: stage flow runs of the deployments on cpu-pool and tpu-pool,
started by process workers, on the shared real server (`prefect_stack`). No mocks: flows run in
worker processes, as they do for users."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from prefect.client.schemas.filters import FlowRunFilter
from prefect.states import AwaitingRetry, Crashed

from flows.local_stack import POOLS, PROJECT_DIR
from helpers import HOOKS, deployment_run, latest_run, run_deployment_cli, snapshot, wait_for_state


def stage_runs_of(client, generate_run) -> dict[str, list]:
    """The stage flow runs started (as subflows, through tasks) by one generate run, by flow name."""
    task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [generate_run.id]}))
    children = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_task_run_id={"any_": [t.id for t in task_runs]})
    )
    flows = {f.id: f.name for f in client.read_flows()}
    by_stage: dict[str, list] = {}
    for run in children:
        by_stage.setdefault(flows[run.flow_id], []).append(run)
    return by_stage


def params(model, store, **extra):
    return {"model": str(model), "prompts": ["a red cat", "a blue dog"], "seeds": [0, 1], "steps": 2, "height": 64,
            "width": 64, "store": str(store), "dispatch": "deployments", **extra}


def test_generate_deployment_runs_each_stage_on_its_pool(prefect_stack, prefect_client, tiny_sdxl, tmp_path):
    result = run_deployment_cli(prefect_stack, "generate/stagediff", params(tiny_sdxl, tmp_path))
    assert result.returncode == 0, result.stdout[-2000:]

    generate_run = latest_run(prefect_client, "generate")
    assert generate_run.state.is_completed() and generate_run.work_pool_name == "cpu-pool"
    stage_runs = stage_runs_of(prefect_client, generate_run)
    assert {run.work_pool_name for run in stage_runs["encode"]} == {"cpu-pool"}
    assert {run.work_pool_name for run in stage_runs["denoise"] + stage_runs["decode"]} == {"tpu-pool"}
    assert all(run.state.is_completed() for runs in stage_runs.values() for run in runs)

    assert len(list(tmp_path.glob("embeddings/sdxl/*.safetensors"))) == 2
    assert len(list(tmp_path.glob("latents/sdxl/*.safetensors"))) == 4
    assert len(list(tmp_path.glob("media/*.png"))) == 4
    assert len(list(tmp_path.glob("runs/*/contact-sheet.png"))) == 1
    artifacts = prefect_client.read_artifacts(flow_run_filter=FlowRunFilter(id={"any_": [generate_run.id]}))
    assert {"progress", "table", "markdown"} <= {artifact.type for artifact in artifacts}
    assert any((artifact.key or "").startswith("contact-sheet-") for artifact in artifacts)
    progress = [a for a in artifacts if a.type == "progress"]
    assert progress[0].data == 100.0


def test_a_stage_that_fails_once_is_retried_and_the_run_completes(prefect_stack, prefect_client, tiny_sdxl, tmp_path):
    marker = tmp_path / "denoise-failed-once"
    prefect_stack.kill("worker-tpu-pool")
    prefect_stack.start_worker("tpu-pool", env={"PYTHONPATH": f"{HOOKS}:{PROJECT_DIR}",
                                                "STAGEDIFF_TEST_FAIL_ONCE": f"denoise:{marker}"})
    try:
        result = run_deployment_cli(prefect_stack, "generate/stagediff", params(tiny_sdxl, tmp_path / "store",
                                                                                unit_items=4))
    finally:
        prefect_stack.kill("worker-tpu-pool")
        prefect_stack.start_worker("tpu-pool")
    assert result.returncode == 0, result.stdout[-2000:]
    assert marker.exists()
    denoise_run = stage_runs_of(prefect_client, latest_run(prefect_client, "generate"))["denoise"][0]
    denoise_tasks = prefect_client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [denoise_run.id]}))
    assert [t.run_count for t in denoise_tasks if t.name.startswith("denoise")] == [2]
    assert len(list((tmp_path / "store").glob("media/*.png"))) == 4


def test_a_bad_parameter_fails_a_stage_deployment_run_at_once(prefect_stack, prefect_client, tiny_sdxl, tmp_path):
    parameters = {name: value for name, value in params(tiny_sdxl, tmp_path, steps=-3).items() if name != "dispatch"}
    result = run_deployment_cli(prefect_stack, "denoise/stagediff", parameters)  # a stage flow: no dispatch
    assert result.returncode != 0

    denoise_run = latest_run(prefect_client, "denoise")
    assert denoise_run.state.is_failed() and denoise_run.run_count == 1  # no retry of bad input
    assert "--steps -3 must be a positive integer" in denoise_run.state.message
    assert "\n" not in denoise_run.state.message.strip()
    assert not tmp_path.exists() or not any(tmp_path.rglob("*.safetensors"))


def test_crashed_run_retried_from_the_ui_redoes_only_missing_items(prefect_stack, prefect_client, tiny_sdxl, tmp_path):
    store = tmp_path / "store"
    parameters = params(tiny_sdxl, store, steps=30, prompts=["a red cat"], seeds=[0, 1, 2, 3], unit_items=4)
    with deployment_run(prefect_stack, prefect_client, "generate/stagediff", parameters) as generate_run_id:
        deadline = time.monotonic() + 300
        while not list(store.glob("latents/sdxl/*.safetensors")) and time.monotonic() < deadline:
            time.sleep(0.2)
        prefect_stack.kill("worker-tpu-pool")  # the worker and its flow run die mid-denoise
        done_before = snapshot(store)
        assert 0 < len([p for p in done_before if p.startswith("latents/")]) < 4

        (denoise_run,) = stage_runs_of(prefect_client, prefect_client.read_flow_run(generate_run_id))["denoise"]
        # What the server's heartbeat monitor does for a run whose worker died:
        prefect_client.set_flow_run_state(denoise_run.id, Crashed(message="worker killed"), force=True)
        wait_for_state(prefect_client, generate_run_id, lambda s: s.is_final())

        prefect_stack.start_worker("tpu-pool")
        prefect_client.set_flow_run_state(generate_run_id, AwaitingRetry(), force=True)  # the UI's "Retry"
        finished = wait_for_state(prefect_client, generate_run_id, lambda s: s.is_final())
        assert finished.state.is_completed()

    after = snapshot(store)
    assert len([p for p in after if p.startswith("latents/")]) == 4
    assert all(after[path] == mtime for path, mtime in done_before.items() if path.startswith("latents/"))


def test_sweep_is_scheduled_and_a_new_seed_generates_only_its_items(prefect_stack, prefect_client, tiny_sdxl, tiny_loras, tmp_path):
    deployment = prefect_client.read_deployment_by_name("sweep/nightly")
    assert deployment.schedules and deployment.schedules[0].schedule.cron == "0 3 * * *"

    # A nightly LoRA evaluation: the base model (scale 0) beside the LoRA at 0.8.
    lora = str(tiny_loras("sdxl"))
    sweep = {"model": str(tiny_sdxl), "prompts": ["a red cat"], "seed_start": 0, "seed_count": 1, "steps": 2,
             "loras": [{"source": lora, "scale": 0}, {"source": lora, "scale": 0.8}], "store": str(tmp_path),
             "run_name": "first"}
    assert run_deployment_cli(prefect_stack, "sweep/nightly", sweep).returncode == 0
    first = snapshot(tmp_path)
    manifest = json.loads((tmp_path / "runs/first/manifest.json").read_text())
    assert [(i["seed"], i["loras"][0]["scale"]) for i in manifest["items"]] == [(0, 0.0), (0, 0.8)]
    assert "runs/first/contact-sheet.png" in first
    # The LoRA has text-encoder weights: one embedding without it, one with it.
    assert len([path for path in first if path.startswith("embeddings/")]) == 2
    assert run_deployment_cli(prefect_stack, "sweep/nightly", {**sweep, "seed_count": 2, "run_name": "second"}).returncode == 0
    second = snapshot(tmp_path)

    new = {path for path in second if path not in first and not path.startswith("runs/")}
    assert {path.split("/")[0] for path in new} == {"latents", "media"} and len(new) == 4
    assert all(second[path] == mtime for path, mtime in first.items())



def test_pool_workers_started_by_path_from_a_shell_without_the_venv_run_a_batch(prefect_stack, prefect_client,
                                                                               tiny_sdxl, tmp_path):
    """The README's plain setup: `.venv/bin/prefect worker start --pool ...` as a service manager or a container
    entrypoint starts it, with no venv on PATH (the machine's `python` has no Prefect)."""
    prefect = Path(sys.executable).parent / "prefect"
    env = {name: value for name, value in prefect_stack.env.items() if name not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/bin:/bin"
    for pool in POOLS:
        prefect_stack.kill(f"worker-{pool}")
        with open(prefect_stack.logs / f"plain-worker-{pool}.log", "ab") as log:
            prefect_stack.processes[f"plain-worker-{pool}"] = subprocess.Popen(
                [str(prefect), "worker", "start", "--pool", pool, "--type", "process"], cwd=PROJECT_DIR, env=env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        result = run_deployment_cli(prefect_stack, "generate/stagediff", params(tiny_sdxl, tmp_path))
    finally:
        for pool in POOLS:
            prefect_stack.kill(f"plain-worker-{pool}")
            prefect_stack.start_worker(pool)
    assert result.returncode == 0, result.stdout[-2000:]
    generate_run = latest_run(prefect_client, "generate")
    assert generate_run.state.is_completed()
    assert {run.state.name for runs in stage_runs_of(prefect_client, generate_run).values() for run in runs} == {"Completed"}
    assert len(list(tmp_path.glob("media/*.png"))) == 4
