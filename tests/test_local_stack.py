"""`make serve` (`python -m flows.local_stack`) stops every process it started, however it is stopped."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request

import psutil

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
