"""Faults a warm stage worker (`tasks.worker`) meets and survives, on the shared real server."""

from __future__ import annotations

import asyncio
import logging

import psutil
import pytest
from prefect import settings, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, LogFilter
from prefect.states import Cancelling, Running

from flows.generate import generate
from flows.local_stack import PROJECT_DIR, free_port
from helpers import HOOKS, deployment_run, latest_run, snapshot, wait_for_state
from tasks import worker
from test_local_stack import wait_until
from test_prefect_warm import stage_report, stage_task_runs


@task
def a_stage():
    pass


def test_a_redelivered_run_is_run_when_the_heartbeats_cannot_be_read(prefect_client, monkeypatch, caplog):
    # A run another worker had started, given back by the server: the worker looks for that worker's
    # heartbeats, and the API fails right then (here: the read goes to a port where no server runs).
    task_run = prefect_client.create_task_run(a_stage, flow_run_id=None, dynamic_key="0", state=Running())
    monkeypatch.setattr(worker, "REDELIVERY_WAIT_SECONDS", 0)
    stopped_server = f"http://127.0.0.1:{free_port()}/api"

    async def reason_to_skip():
        async with get_client() as client:
            with settings.temporary_settings({settings.PREFECT_API_URL: stopped_server}):
                return await worker._reason_to_skip(client, task_run, "this-worker")

    with caplog.at_level(logging.WARNING, logger="stagediff.worker"):
        assert asyncio.run(reason_to_skip()) is None  # run it: doing it twice costs time, dropping it loses it
    assert any("Could not read the stage workers' heartbeats" in record.getMessage() for record in caplog.records)


# -- no accelerator worker at all (its node pool scaled to zero) -----------------------------------
ACCELERATOR = "stage-accelerator-0"


def warm_params(model, store, **extra):
    return {"model": str(model), "prompts": ["a red cat"], "seeds": [0, 1], "steps": 2, "height": 64, "width": 64,
            "store": str(store), "dispatch": "warm", **extra}


def serving(stage: str) -> int:
    from flows.stage_workers import live_workers

    return live_workers([stage])[stage]


@pytest.fixture
def no_accelerator_worker(prefect_stack, prefect_client):
    """The stack's denoise+decode worker killed for the test, and one started again after it."""
    prefect_stack.kill(ACCELERATOR)
    wait_until(lambda: serving("denoise") == 0, "the server to drop the killed worker")
    try:
        yield
    finally:
        if ACCELERATOR not in prefect_stack.processes:
            prefect_stack.wait_until_connected(prefect_stack.start_stage_worker(ACCELERATOR, "denoise,decode"))


def run_logs(client, run_id) -> list[str]:
    return [log.message for log in client.read_logs(log_filter=LogFilter(flow_run_id={"any_": [run_id]}))]


def test_without_any_accelerator_worker_the_run_says_so_and_fails_after_stage_timeout(
        no_accelerator_worker, prefect_client, tiny_sdxl, tmp_path):
    with pytest.raises(Exception, match="No stage worker served denoise for 15s"):
        generate(**warm_params(tiny_sdxl, tmp_path, stage_timeout=15))

    run = latest_run(prefect_client, "generate")
    assert run.state.is_failed() and "No stage worker served denoise for 15s" in run.state.message
    wait_until(lambda: any(m.startswith("No stage worker serves denoise") for m in run_logs(prefect_client, run.id)),
               "the log line")
    artifacts = prefect_client.read_artifacts(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))
    assert any(a.type == "markdown" and a.description == "No stage worker serves denoise" for a in artifacts)
    assert not list(tmp_path.glob("latents/**/*.safetensors"))


def test_a_run_waiting_for_an_accelerator_worker_completes_when_one_comes(
        no_accelerator_worker, prefect_stack, prefect_client, tiny_sdxl, tmp_path):
    with deployment_run(prefect_stack, prefect_client, "generate/stagediff",
                        warm_params(tiny_sdxl, tmp_path, stage_timeout=600)) as run_id:
        wait_until(lambda: any(m.startswith("No stage worker serves denoise") for m in run_logs(prefect_client, run_id)),
                   "the run to say that no worker serves denoise")

        prefect_stack.wait_until_connected(prefect_stack.start_stage_worker(ACCELERATOR, "denoise,decode"))
        assert wait_for_state(prefect_client, run_id, lambda state: state.is_final()).state.is_completed()
    assert len(list(tmp_path.glob("media/*.png"))) == 2


# -- cancelling a generate run ---------------------------------------------------------------------
def test_cancelling_a_generate_run_stops_the_stage_run_a_worker_has_taken(prefect_stack, prefect_client, tiny_sdxl,
                                                                         tmp_path):
    with deployment_run(prefect_stack, prefect_client, "generate/stagediff",
                        warm_params(tiny_sdxl, tmp_path, seeds=[0], steps=5000)) as run_id:

        def denoise_running():
            runs = stage_task_runs(prefect_client, prefect_client.read_flow_run(run_id)).get("denoise", [])
            return runs[0] if runs and runs[0].state and runs[0].state.is_running() else None

        wait_until(denoise_running, "the denoise run to start", timeout=300)
        denoise = denoise_running()
        prefect_client.set_flow_run_state(run_id, Cancelling(), force=True)  # as the UI's Cancel does

        wait_until(lambda: prefect_client.read_task_run(denoise.id).state.is_final(), "the denoise run to end")
        assert prefect_client.read_task_run(denoise.id).state.is_cancelled()
        assert wait_for_state(prefect_client, run_id, lambda state: state.is_final()).state.is_cancelled()
    assert not [path for path in (tmp_path / "latents").rglob("*") if path.is_file()]  # no latents, no half file

    # The worker is free: the next batch runs on it.
    generate(**warm_params(tiny_sdxl, tmp_path / "next", seeds=[0]))
    (next_denoise,) = stage_task_runs(prefect_client, latest_run(prefect_client, "generate"))["denoise"]
    assert stage_report(prefect_client, next_denoise)[0] == prefect_stack.processes[ACCELERATOR].pid


# -- a worker stuck inside a stage -----------------------------------------------------------------
def test_a_run_stuck_on_a_worker_that_still_beats_is_taken_by_another(no_accelerator_worker, prefect_stack,
                                                                     prefect_client, tiny_sdxl, tmp_path):
    # The only accelerator worker hangs in its first denoise call (its event loop goes on beating) and
    # counts a run without progress for 3 s as stuck.
    marker = tmp_path / "denoise-hung"
    stuck = prefect_stack.start_stage_worker("stage-stuck", "denoise,decode", env={
        "PYTHONPATH": f"{HOOKS}:{PROJECT_DIR}", "STAGEDIFF_TEST_HANG_ONCE": f"denoise_batch:{marker}",
        "STAGEDIFF_STALL_SECONDS": "3"})
    try:
        prefect_stack.wait_until_connected(stuck)
        with deployment_run(prefect_stack, prefect_client, "generate/stagediff",
                            warm_params(tiny_sdxl, tmp_path / "store")) as run_id:
            wait_until(marker.exists, "the worker to hang", timeout=300)
            replacement = prefect_stack.start_stage_worker(ACCELERATOR, "denoise,decode")
            prefect_stack.wait_until_connected(replacement)
            assert wait_for_state(prefect_client, run_id, lambda state: state.is_final()).state.is_completed()
        assert any("was lost" in message for message in run_logs(prefect_client, run_id))
        assert stuck.poll() is None  # it still hangs: the run went on elsewhere
        assert len(list((tmp_path / "store").glob("media/*.png"))) == 2
    finally:
        prefect_stack.kill("stage-stuck")


# -- the generate run's own process dies -----------------------------------------------------------
def test_a_generate_run_whose_process_dies_is_run_again_and_completes_the_batch(prefect_stack, prefect_client,
                                                                                tiny_sdxl, tmp_path):
    parameters = warm_params(tiny_sdxl, tmp_path, seeds=[0, 1, 2, 3], steps=20, unit_items=1)
    with deployment_run(prefect_stack, prefect_client, "generate/stagediff", parameters) as crashed_id:
        wait_until(lambda: list(tmp_path.glob("media/*.png")), "a first image", timeout=300)
        (flow_process,) = [p for p in psutil.Process(prefect_stack.processes["worker-cpu-pool"].pid).children(
            recursive=True) if "prefect.engine" in " ".join(p.cmdline())
            and p.environ().get("PREFECT__FLOW_RUN_ID") == str(crashed_id)]
        flow_process.kill()  # as a preempted VM would
        flow_process.wait(timeout=30)
        done_before = {path: mtime for path, mtime in snapshot(tmp_path).items()
                       if path.startswith(("latents/", "media/"))}
        assert wait_for_state(prefect_client, crashed_id, lambda state: state.is_final()).state.is_crashed()

    def resumed_run():
        runs = prefect_client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["generate"])))
        return next((run for run in runs if run.parameters.get("resumed") == 1
                     and run.parameters.get("store") == str(tmp_path)), None)

    wait_until(resumed_run, "the batch to be run again", timeout=120)
    resumed = wait_for_state(prefect_client, resumed_run().id, lambda state: state.is_final())
    assert resumed.state.is_completed(), resumed.state.message
    after = snapshot(tmp_path)
    assert len(list(tmp_path.glob("media/*.png"))) == 4
    assert all(after[path] == mtime for path, mtime in done_before.items())  # nothing finished was rewritten
