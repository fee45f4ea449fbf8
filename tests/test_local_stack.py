"""`make serve` (`python -m flows.local_stack`) stops every process it started, however it is stopped."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from flows.local_stack import PROJECT_DIR, free_port


def start_serve_in_background(home, output):
    """As `make serve &` from a script: a background job of a non-interactive shell ignores SIGINT."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.local_stack", "--port", str(port), "--home", str(home)], cwd=PROJECT_DIR,
        stdout=output, stderr=subprocess.STDOUT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    return process, f"http://127.0.0.1:{port}/api"


def wait_until(condition, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def server_answers(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def assert_stops_everything(process, signum) -> None:
    started = psutil.Process(process.pid).children(recursive=True)
    assert started
    process.send_signal(signum)
    assert process.wait(timeout=60) == 0
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, [p.cmdline() for p in alive]


def test_sigterm_stops_the_server_and_every_worker(tmp_path):
    output = tmp_path / "serve.out"
    with open(output, "w") as file:
        process, api_url = start_serve_in_background(tmp_path / "home", file)
    try:
        wait_until(lambda: "Prefect UI:" in output.read_text(), "the stack to start")
        assert_stops_everything(process, signal.SIGTERM)
    finally:
        process.kill()


def test_sigint_stops_a_background_stack_even_while_it_starts(tmp_path):
    with open(tmp_path / "serve.out", "w") as file:
        process, api_url = start_serve_in_background(tmp_path / "home", file)
    try:
        wait_until(lambda: server_answers(api_url), "the server to answer")
        assert_stops_everything(process, signal.SIGINT)
    finally:
        process.kill()


def connected_worker_ids(api_url: str) -> set[str]:
    request = urllib.request.Request(f"{api_url}/task_workers/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return {worker["identifier"] for worker in json.loads(response.read())}


def accelerator_worker_pids(stack_pid: int) -> set[int]:
    """The live denoise+decode stage workers that the stack runs."""
    pids = set()
    for process in psutil.Process(stack_pid).children(recursive=True):
        try:
            if "tasks.worker" in process.cmdline() and "denoise,decode" in process.cmdline():
                pids.add(process.pid)
        except psutil.Error:  # exited (a zombie until the stack reaps it)
            pass
    return pids


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    """One `make serve` for the module's tests: (process, api_url, port, output file); stopped with
    SIGTERM at the end, which must stop everything it started, restarted workers included."""
    home = tmp_path_factory.mktemp("serve")
    output = home / "serve.out"
    with open(output, "w") as file:
        process, api_url = start_serve_in_background(home / "home", file)
    try:
        wait_until(lambda: "Prefect UI:" in output.read_text(), "the stack to start")
        yield process, api_url, int(api_url.split(":")[2].split("/")[0]), output
        assert_stops_everything(process, signal.SIGTERM)
    finally:
        process.kill()


def test_a_stage_worker_that_dies_is_started_again(serving):
    process, api_url, _, output = serving
    (killed,) = accelerator_worker_pids(process.pid)
    os.kill(killed, signal.SIGKILL)

    wait_until(lambda: accelerator_worker_pids(process.pid) - {killed}, "a new accelerator worker", timeout=120)
    (replacement,) = accelerator_worker_pids(process.pid)
    wait_until(lambda: f"{socket.gethostname()}-{replacement}" in connected_worker_ids(api_url),
               "the new worker to connect", timeout=180)
    assert process.poll() is None
    assert "stage-accelerator-0 exited" in output.read_text()


def test_a_second_stack_on_a_taken_port_refuses_to_start(serving, tmp_path):
    _, api_url, port, _ = serving
    second = subprocess.run([sys.executable, "-m", "flows.local_stack", "--port", str(port), "--home",
                             str(tmp_path / "home")], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120)
    assert second.returncode != 0
    lines = (second.stdout + second.stderr).strip().splitlines()
    assert len(lines) == 1 and f"port {port} is taken" in lines[0], lines
    assert not (tmp_path / "home").exists()  # no server, no deployment, no worker
    assert server_answers(api_url)
