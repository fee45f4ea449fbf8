"""The warm way to run stages: long-lived stage workers (`tasks.worker`) on the shared real server
(`prefect_stack`: one encode worker, one denoise+decode worker). What each run did is read from the
server's records (task runs, their logs) and from the store, never from timing."""

from __future__ import annotations

import os
import re
import shutil
import time

import psutil
import pytest
from prefect.client.schemas.filters import FlowRunFilter, LogFilter, LogFilterTaskRunId

from flows.generate import generate
from helpers import deployment_run, garble_body, latest_run, run_deployment_cli, snapshot, wait_for_state
from stagediff.plan import make_plan
from stagediff.request import Request
from stagediff.tiny import build_tiny_model

ACCELERATOR = "stage-accelerator-0"
WHERE = re.compile(r"^(encode|denoise|decode) on \S+ \(pid (\d+)\): (.*)$")


def stage_task_runs(client, generate_run) -> dict[str, list]:
    """The stage task runs of a generate run (they are its task runs, run by the stage workers), by stage."""
    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [generate_run.id]}))
    by_stage: dict[str, list] = {}
    for run in runs:
        stage = run.name.split("-")[0]
        if stage in ("encode", "denoise", "decode"):
            by_stage.setdefault(stage, []).append(run)
    return by_stage


def stage_report(client, task_run, timeout: float = 30) -> tuple[int, str]:
    """(worker pid, summary) from the line a stage task logs when it finishes (logs reach the server
    a moment after the run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run.id])))
        for log in logs:
            if match := WHERE.match(log.message):
                return int(match.group(2)), match.group(3)
        time.sleep(0.5)
    raise AssertionError(f"{task_run.name} logged no summary line")


def warm_params(model, store, **extra):
    return {"model": str(model), "prompts": ["a red cat", "a blue dog"], "seeds": [0, 1], "steps": 2, "height": 64,
            "width": 64, "store": str(store), **extra}


def test_second_batch_on_warm_workers_loads_no_model_and_compiles_nothing(prefect_stack, prefect_client, tiny_sdxl,
                                                                         tmp_path):
    accelerator = prefect_stack.processes[ACCELERATOR].pid
    reports = []
    for seeds in ([0, 1], [2, 3]):
        parameters = warm_params(tiny_sdxl, tmp_path, seeds=seeds, backend="torchax")
        result = run_deployment_cli(prefect_stack, "generate/stagediff", parameters)
        assert result.returncode == 0, result.stdout[-2000:]
        generate_run = latest_run(prefect_client, "generate")
        runs = stage_task_runs(prefect_client, generate_run)
        assert all(run.state.is_completed() for stage_runs in runs.values() for run in stage_runs)
        reports.append({stage: [stage_report(prefect_client, run) for run in stage_runs] for stage, stage_runs in runs.items()})
    first, second = reports

    assert {pid for pid, _ in first["encode"]} == {prefect_stack.processes["stage-encode"].pid}
    assert {pid for stage in ("denoise", "decode") for pid, _ in first[stage] + second[stage]} == {accelerator}
    assert any("compiled 1 shapes" in summary for _, summary in first["denoise"])
    # The prompts are encoded already (encode only checks them); denoise and decode use what is loaded.
    assert all(second[stage] for stage in ("encode", "denoise", "decode"))
    assert all("already in the store" in summary for _, summary in second["encode"])
    assert all("already loaded" in summary for stage in ("denoise", "decode") for _, summary in second[stage])
    assert all("compiled nothing" in summary for _, summary in second["denoise"])
    assert len(list(tmp_path.glob("media/*.png"))) == 8

    artifacts = prefect_client.read_artifacts(flow_run_filter=FlowRunFilter(id={"any_": [generate_run.id]}))
    assert {"progress", "table", "markdown"} <= {artifact.type for artifact in artifacts}
    assert max(a.data for a in artifacts if a.type == "progress" and a.task_run_id is None) == 100.0


def test_a_worker_killed_mid_denoise_hands_its_run_to_a_new_worker(prefect_stack, prefect_client, tiny_sdxl, tmp_path):
    parameters = warm_params(tiny_sdxl, tmp_path, prompts=["a red cat"], seeds=[0, 1, 2, 3], steps=15, unit_items=4)
    with deployment_run(prefect_stack, prefect_client, "generate/stagediff", parameters) as generate_run_id:
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob("latents/sdxl/*.safetensors")) and time.monotonic() < deadline:
            time.sleep(0.1)
        prefect_stack.kill(ACCELERATOR)
        done_before = {path: mtime for path, mtime in snapshot(tmp_path).items() if path.startswith("latents/")}
        assert 0 < len(done_before) < 4

        replacement = prefect_stack.start_stage_worker(ACCELERATOR, "denoise,decode")
        finished = wait_for_state(prefect_client, generate_run_id, lambda state: state.is_final())
        assert finished.state.is_completed()

    (denoise_run,) = stage_task_runs(prefect_client, finished)["denoise"]
    worker, summary = stage_report(prefect_client, denoise_run)  # the same run, finished by the new worker
    assert worker == replacement.pid and summary.startswith(f"{4 - len(done_before)} new of 4")
    after = snapshot(tmp_path)
    assert len([path for path in after if path.startswith("latents/")]) == 4
    assert all(after[path] == mtime for path, mtime in done_before.items())
    assert len(list(tmp_path.glob("media/*.png"))) == 4


def test_corrupt_latents_behind_an_intact_header_are_denoised_again_through_the_workers(prefect_stack, prefect_client,
                                                                                        tiny_sdxl, tmp_path):
    """The decode worker finds the latents body corrupt (planning read only the header), notes it and fails
    its run; the generate run has the accelerator worker denoise that item again, decodes it, and completes."""
    parameters = warm_params(tiny_sdxl, tmp_path, prompts=["a red cat"], seeds=[0])
    assert run_deployment_cli(prefect_stack, "generate/stagediff", parameters).returncode == 0
    plan = make_plan(Request(**parameters))
    (item,) = plan.items
    latents, media = tmp_path / item.latents_path, tmp_path / item.media_path
    garble_body(latents)
    garbled = latents.read_bytes()
    media.unlink()

    with deployment_run(prefect_stack, prefect_client, "generate/stagediff", parameters) as generate_run_id:
        finished = wait_for_state(prefect_client, generate_run_id, lambda state: state.is_final())
    assert finished.state.is_completed()
    runs = stage_task_runs(prefect_client, finished)
    assert sorted(run.state.type.value for run in runs["decode"]) == ["COMPLETED", "FAILED"]
    assert [run.state.type.value for run in runs["denoise"]] == ["COMPLETED"]
    assert latents.read_bytes() != garbled and media.exists()
    plan.store.read_tensors(item.latents_path, item.latents_key)  # whole again


@pytest.fixture
def second_accelerator(prefect_stack):
    """A second warm denoise+decode worker, for one test."""
    worker = prefect_stack.start_stage_worker("stage-accelerator-1", "denoise,decode")
    try:
        prefect_stack.wait_until_connected(worker)
        yield worker
    finally:
        prefect_stack.kill("stage-accelerator-1")


def test_two_accelerator_workers_denoise_two_units_at_the_same_time(prefect_stack, prefect_client, second_accelerator,
                                                                     tiny_sdxl, tmp_path):
    # Long enough to denoise that one unit is still denoising when the other starts.
    generate(**warm_params(tiny_sdxl, tmp_path, steps=80, dispatch="warm", unit_items=2))
    runs = stage_task_runs(prefect_client, latest_run(prefect_client, "generate"))["denoise"]
    workers = {stage_report(prefect_client, run)[0] for run in runs}
    assert len(runs) == 2 and len(workers) == 2
    assert max(run.start_time for run in runs) < min(run.end_time for run in runs)


def test_one_prompt_over_24_seeds_is_denoised_by_both_accelerator_workers(prefect_stack, prefect_client,
                                                                           second_accelerator, tiny_sdxl, tmp_path):
    generate(**warm_params(tiny_sdxl, tmp_path, prompts=["a red fox"], seeds=["0-23"], steps=10, dispatch="warm"))
    runs = stage_task_runs(prefect_client, latest_run(prefect_client, "generate"))
    workers = {stage_report(prefect_client, run)[0] for run in runs["denoise"]}

    assert len(runs["encode"]) == 1 and len(runs["denoise"]) == len(runs["decode"]) == 4  # 6 items each
    assert workers == {prefect_stack.processes[ACCELERATOR].pid, second_accelerator.pid}
    assert len(list(tmp_path.glob("media/*.png"))) == 24


@pytest.fixture(scope="module")
def two_small_models(tmp_path_factory):
    """A small SDXL (a 46M-parameter UNet: its memory shows in RSS) and another model with the same files."""
    root = tmp_path_factory.mktemp("small-models")
    first = build_tiny_model("sdxl", root / "a", scale="small")
    second = shutil.copytree(first, root / "b", copy_function=os.link)
    return first, second


def test_a_worker_alternating_models_holds_one_model_per_stage(prefect_stack, prefect_client, two_small_models,
                                                               tmp_path):
    model_a, model_b = two_small_models
    model_bytes = sum(path.stat().st_size for path in model_a.glob("unet/*.safetensors"))
    worker = psutil.Process(prefect_stack.processes[ACCELERATOR].pid)  # the only denoise+decode worker
    _reset_peak_rss(worker.pid)

    resident = []
    for index, model in enumerate((model_a, model_b, model_a)):
        generate(**warm_params(model, tmp_path / str(index), prompts=["a red cat"], seeds=[0], steps=1, dispatch="warm"))
        resident.append(worker.memory_info().rss)
    peak = _peak_rss(worker.pid)

    # Holding A and B at once would add a whole model; releasing A for B keeps the worker flat.
    assert resident[2] - resident[0] < model_bytes / 4, (resident, model_bytes)
    assert peak - resident[0] < model_bytes / 2, (peak, resident, model_bytes)


def _reset_peak_rss(pid: int) -> None:
    """Start the process's peak resident memory (VmHWM) afresh from its current value."""
    with open(f"/proc/{pid}/clear_refs", "w") as file:
        file.write("5")


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in bytes."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")
