"""The flow host (`flows.flow_host`) and its launcher (`flows.flow_launch`): process workers' flow runs
are forked from a host that imported everything once, and behave as processes of their own. On the
shared real server (`prefect_stack`), with its host."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import psutil
from prefect.states import Cancelling, Crashed

from flows.local_stack import PROJECT_DIR
from helpers import latest_run, run_deployment_cli, wait_for_state


def host_log(stack) -> str:
    return (stack.logs / "flow-host.log").read_text()


def forked_pid(stack, flow_run_id, timeout: float = 120) -> int:
    """The pid the host forked for a flow run, from its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(rf"flow run {flow_run_id} in pid (\d+)", host_log(stack))
        if found:
            return int(found.group(1))
        time.sleep(0.2)
    raise AssertionError(f"the flow host did not fork flow run {flow_run_id}:\n{host_log(stack)[-2000:]}")


def launch(stack, **environment) -> subprocess.CompletedProcess:
    """`python -m flows.flow_launch` as a process worker runs it, with a flow-run id the engine refuses."""
    env = {**stack.env, "PREFECT__FLOW_RUN_ID": "not-a-flow-run", **environment}
    return subprocess.run([sys.executable, "-m", "flows.flow_launch"], cwd=PROJECT_DIR, env=env,
                          capture_output=True, text=True, timeout=120)


def test_deployment_flow_runs_are_forked_from_the_flow_host(prefect_stack, prefect_client, tiny_sdxl, tmp_path):
    parameters = {"model": str(tiny_sdxl), "prompts": ["a red cat"], "seeds": [0], "store": str(tmp_path)}
    result = run_deployment_cli(prefect_stack, "encode/stagediff", parameters)
    assert result.returncode == 0, result.stdout[-2000:]

    run = latest_run(prefect_client, "encode")
    assert run.state.is_completed()
    pid = forked_pid(prefect_stack, run.id)
    assert re.search(rf"pid {pid} exited with 0", host_log(prefect_stack))
    assert len(list(tmp_path.glob("embeddings/sdxl/*.safetensors"))) == 1


def test_the_launcher_hands_over_its_streams_and_exit_code(prefect_stack):
    result = launch(prefect_stack)
    assert result.returncode == 1
    assert "Invalid flow run id" in result.stderr + result.stdout  # written by the forked engine
    assert re.search(r"flow run not-a-flow-run in pid (\d+)", host_log(prefect_stack))


def test_many_launchers_at_once_each_get_their_own_flow_run_process(prefect_stack):
    """The host serves one launcher at a time on one thread: several at once, twice over, must each get
    a forked process of their own, their own streams back, and their own exit code."""
    before = host_log(prefect_stack).count("flow run not-a-flow-run")
    env = {**prefect_stack.env, "PREFECT__FLOW_RUN_ID": "not-a-flow-run"}
    for _ in range(2):
        launchers = [subprocess.Popen([sys.executable, "-m", "flows.flow_launch"], cwd=PROJECT_DIR, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                     for _ in range(6)]
        outputs = [launcher.communicate(timeout=120)[0] for launcher in launchers]
        assert [launcher.returncode for launcher in launchers] == [1] * 6
        assert all(output.count("Invalid flow run id") == 1 for output in outputs), outputs
    log = host_log(prefect_stack)
    assert log.count("flow run not-a-flow-run") == before + 12
    forked = re.findall(r"flow run not-a-flow-run in pid (\d+)", log)[-12:]
    assert len(set(forked)) == 12
    assert all(re.search(rf"pid {pid} exited with 1", log) for pid in forked)


def test_a_launcher_of_another_pythonpath_runs_the_engine_itself(prefect_stack, tmp_path):
    before = host_log(prefect_stack).count("flow run not-a-flow-run")
    result = launch(prefect_stack, PYTHONPATH=f"{tmp_path}{os.pathsep}{PROJECT_DIR}")
    assert result.returncode == 1
    assert "Invalid flow run id" in result.stderr + result.stdout
    assert host_log(prefect_stack).count("flow run not-a-flow-run") == before


def start_long_denoise(stack, client, model, store):
    """A denoise deployment run long enough to act on while it runs; returns (run, forked pid)."""
    parameters = {"model": str(model), "prompts": ["a red cat"], "seeds": list(range(8)), "steps": 50,
                  "height": 64, "width": 64, "store": str(store)}
    assert run_deployment_cli(stack, "encode/stagediff", parameters).returncode == 0
    run_deployment_cli(stack, "denoise/stagediff", parameters, watch=False)
    run = latest_run(client, "denoise")
    pid = forked_pid(stack, run.id)
    wait_for_state(client, run.id, lambda state: state.is_running())
    return run, pid


def test_cancelling_a_forked_flow_run_from_the_ui_stops_it(prefect_stack, prefect_client, tiny_sdxl, tmp_path):
    run, pid = start_long_denoise(prefect_stack, prefect_client, tiny_sdxl, tmp_path)
    prefect_client.set_flow_run_state(run.id, Cancelling(), force=True)  # the UI's "Cancel"
    finished = wait_for_state(prefect_client, run.id, lambda state: state.is_final(), timeout=120)
    assert finished.state.is_cancelled()
    try:
        psutil.Process(pid).wait(timeout=30)
    except psutil.NoSuchProcess:
        pass
    assert len(list(tmp_path.glob("latents/sdxl/*.safetensors"))) < 8


def test_a_killed_launcher_takes_its_forked_flow_run_with_it(prefect_stack, prefect_client, tiny_sdxl, tmp_path):
    run, pid = start_long_denoise(prefect_stack, prefect_client, tiny_sdxl, tmp_path)
    prefect_stack.kill("worker-tpu-pool")  # the worker and its launcher, as SIGKILL leaves them
    try:
        psutil.Process(pid).wait(timeout=10)  # raises TimeoutExpired if the flow run outlives its launcher
    except psutil.NoSuchProcess:
        pass
    finally:
        prefect_client.set_flow_run_state(run.id, Crashed(message="worker killed"), force=True)
        prefect_stack.start_worker("tpu-pool")
    deadline = time.monotonic() + 10
    while not re.search(rf"pid {pid} exited with -9", host_log(prefect_stack)):
        assert time.monotonic() < deadline, host_log(prefect_stack)[-2000:]
        time.sleep(0.2)
    assert len(list(tmp_path.glob("latents/sdxl/*.safetensors"))) < 8
