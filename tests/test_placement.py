"""Placement is checked where a stage runs: a batch planned on a host with one device runs its `tp=8`
mesh on an accelerator worker with eight, and a stage worker with too few devices fails the stage run
at once with one line and writes nothing. On the shared real server (`prefect_stack`), whose warm
accelerator worker sees the eight virtual devices the tests set up (XLA_FLAGS)."""

from __future__ import annotations

import contextlib

from prefect.client.schemas.filters import FlowRunFilter

from helpers import latest_run, run_deployment_cli
from test_prefect_warm import stage_report, stage_task_runs

ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


@contextlib.contextmanager
def pool_worker_with_one_device(stack, pool: str):
    """The process worker of `pool` (and its flow runs) sees one JAX device, for the block."""
    stack.kill(f"worker-{pool}")
    stack.start_worker(pool, env=ONE_DEVICE)
    try:
        yield
    finally:
        stack.kill(f"worker-{pool}")
        stack.start_worker(pool)


def params(model, store, **extra):
    return {"model": str(model), "prompts": ["a red cat"], "seeds": [0, 1], "steps": 2, "height": 64, "width": 64,
            "store": str(store), "mesh": "tp=8", "backend": "torchax", **extra}


def test_a_tp8_batch_planned_on_a_one_device_host_denoises_on_an_eight_device_worker(prefect_stack, prefect_client,
                                                                                     tiny_sdxl, tmp_path):
    with pool_worker_with_one_device(prefect_stack, "cpu-pool"):  # where the generate flow runs
        result = run_deployment_cli(prefect_stack, "generate/stagediff", params(tiny_sdxl, tmp_path, dispatch="warm"))
    assert result.returncode == 0, result.stdout[-3000:]

    generate_run = latest_run(prefect_client, "generate")
    assert generate_run.work_pool_name == "cpu-pool" and generate_run.state.is_completed()
    reports = [stage_report(prefect_client, run) for run in stage_task_runs(prefect_client, generate_run)["denoise"]]
    assert {worker for worker, _ in reports} == {prefect_stack.processes["stage-accelerator-0"].pid}
    assert sum(int(summary.split()[0]) for _, summary in reports) == 2  # "N new of M; ..."
    assert len(list(tmp_path.glob("media/*.png"))) == 2


def test_a_stage_worker_with_too_few_devices_fails_the_stage_run_in_one_line(prefect_stack, prefect_client, tiny_sdxl,
                                                                            tmp_path):
    with pool_worker_with_one_device(prefect_stack, "tpu-pool"):
        result = run_deployment_cli(prefect_stack, "denoise/stagediff", params(tiny_sdxl, tmp_path / "store"))
    assert result.returncode != 0

    run = latest_run(prefect_client, "denoise")
    assert run.state.is_failed() and run.run_count == 1
    assert "--mesh 'tp=8' needs 8 devices, there are 1" in run.state.message
    assert "\n" not in run.state.message.strip()
    (task_run,) = prefect_client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))
    assert task_run.run_count == 1  # bad placement is not retried
    assert not (tmp_path / "store").exists() or not any(path.is_file() for path in (tmp_path / "store").rglob("*"))
