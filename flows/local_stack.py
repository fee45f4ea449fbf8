"""A whole Prefect setup on one machine: server, `cpu-pool` and `tpu-pool`, the deployments of
prefect.yaml, and one process worker per pool. Used by `make serve` and by the real-server tests.

Run: `python -m flows.local_stack [--port 4200]`; Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
POOLS = {"cpu-pool": None, "tpu-pool": 1}
"""Work pools and their concurrency limits: the accelerator runs one stage flow at a time."""
WORKER_QUERY_SECONDS = "1"
"""How often workers look for scheduled stage runs (Prefect's default, 10 s, adds up to 10 s per stage)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalStack:
    """Starts and stops a Prefect server and workers; every process it starts is stopped by `stop()`."""

    def __init__(self, home: Path, port: int | None = None, extra_env: dict[str, str] | None = None):
        self.home = Path(home)
        self.port = port or free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": os.environ.get("PREFECT_UI_ENABLED", "true"),
            "PREFECT_WORKER_QUERY_SECONDS": os.environ.get("PREFECT_WORKER_QUERY_SECONDS", WORKER_QUERY_SECONDS),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(PROJECT_DIR),
            **(extra_env or {}),
        }
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs = self.home / "logs"

    def prefect(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a `prefect` CLI command against this stack's server."""
        command = [sys.executable, "-m", "prefect", "--no-prompt", *args]
        return subprocess.run(command, cwd=PROJECT_DIR, env=self.env, capture_output=True, text=True, check=check)

    def _spawn(self, name: str, *args: str, env: dict | None = None) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", *args], cwd=PROJECT_DIR, env={**self.env, **(env or {})},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.processes[name] = process
        return process

    def start_server(self, timeout: float = 90) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self._spawn("server", "server", "start", "--host", "127.0.0.1", "--port", str(self.port))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"Prefect server did not start on port {self.port}; see {self.logs / 'server.log'}")

    def create_pools(self) -> None:
        for pool, limit in POOLS.items():
            self.prefect("work-pool", "create", pool, "--type", "process", "--overwrite")
            if limit is not None:
                self.prefect("work-pool", "set-concurrency-limit", pool, str(limit))

    def deploy(self) -> None:
        self.prefect("deploy", "--all")

    def start_worker(self, pool: str, env: dict | None = None) -> subprocess.Popen:
        """Start (or restart) the process worker of one pool."""
        limit = ["--limit", str(POOLS[pool])] if POOLS[pool] else []
        return self._spawn(f"worker-{pool}", "worker", "start", "--pool", pool, "--type", "process", *limit, env=env)

    def kill(self, name: str) -> None:
        """Kill a process and everything it started (a worker and its flow-run processes)."""
        process = self.processes.pop(name, None)
        if process and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def start(self) -> "LocalStack":
        self.start_server()
        self.create_pools()
        self.deploy()
        for pool in POOLS:
            self.start_worker(pool)
        return self

    def stop(self) -> None:
        for name in reversed(list(self.processes)):  # workers first, the server last
            process = self.processes[name]
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
            self.processes.pop(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=4200)
    parser.add_argument("--home", default=str(PROJECT_DIR / ".prefect-local"), help="PREFECT_HOME for the server")
    args = parser.parse_args()
    stack = LocalStack(Path(args.home), args.port)
    try:
        stack.start()
        print(f"Prefect UI: http://127.0.0.1:{stack.port}   (export PREFECT_API_URL={stack.api_url})")
        print("Workers: cpu-pool, tpu-pool. Start a batch with:")
        print(f"  PREFECT_API_URL={stack.api_url} prefect deployment run generate/stagediff --watch --params "
              '\'{"model": "demo-models/tiny-sdxl", "prompts": ["a red fox"], "seeds": [0, 1]}\'')
        print(f"Logs: {stack.logs}. Ctrl-C stops the server and the workers.")
        while all(p.poll() is None for p in stack.processes.values()):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
