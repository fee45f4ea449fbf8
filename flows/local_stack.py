"""A whole Prefect setup on one machine: server, `cpu-pool` and `tpu-pool`, the deployments of
prefect.yaml, one process worker per pool (the ephemeral way to run stages, and where generate runs),
and the warm stage workers: one for encode, one per accelerator for denoise and decode. Used by
`make serve` and by the real-server tests.

Run: `python -m flows.local_stack [--port 4200] [--accelerator-workers N]`. SIGTERM, SIGINT (Ctrl-C,
even when started in the background) and SIGHUP stop everything it started. A process that exits
meanwhile (a stage worker crashing) is started again, as a service manager would, with backoff. It
refuses to start when another server already answers on its port.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

PROJECT_DIR = Path(__file__).resolve().parents[1]
POOLS = ("cpu-pool", "tpu-pool")
WORKER_LIMITS = {"cpu-pool": None, "tpu-pool": 1}
"""Flow runs at a time per process worker: one stage run per accelerator. No pool-wide limit: each
accelerator machine runs its own worker."""
STAGE_WORKERS = {"encode": "encode,score", "accelerator": "denoise,decode"}
"""The stages each kind of stage worker serves."""
WORKER_QUERY_SECONDS = "1"
"""How often workers look for scheduled stage runs (Prefect's default, 10 s, adds up to 10 s per stage)."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
RESTART_FIRST_SECONDS = 1.0
RESTART_MAX_SECONDS = 30.0
RESTART_RESET_SECONDS = 60.0
"""A process that exits is started again after 1 s, then after twice the last wait (at most 30 s) while
it keeps exiting; once it has been up a minute, from 1 s again."""
TASK_STORAGE_BLOCK = "remote-file-system/stage-runs"
TASK_STORAGE_SETTINGS = ("PREFECT_TASKS_SCHEDULING_DEFAULT_STORAGE_BLOCK", "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK")
"""Where Prefect keeps task runs' parameters (for task workers) and results: both name the block."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PortTaken(RuntimeError):
    """Another server answers on the stack's port."""


def port_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


class LocalStack:
    """Starts and stops a Prefect server and workers; every process it starts (and whatever those
    start) is stopped by `stop()`."""

    def __init__(self, home: Path, port: int | None = None, extra_env: dict[str, str] | None = None,
                 task_storage: str | None = None):
        self.home = Path(home)
        self.task_storage = task_storage
        """A gs:// folder for stage runs' parameters and results (stage workers on other machines
        reach it); None keeps them under `storage`."""
        self.port = port or free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.storage = self.home / "storage"
        """Where stage runs' parameters and results live: every process submitting or running stage
        runs must use it (on several machines, a shared bucket instead: see the README)."""
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_LOCAL_STORAGE_PATH": str(self.storage),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": os.environ.get("PREFECT_UI_ENABLED", "true"),
            "PREFECT_WORKER_QUERY_SECONDS": os.environ.get("PREFECT_WORKER_QUERY_SECONDS", WORKER_QUERY_SECONDS),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(PROJECT_DIR),
            **(extra_env or {}),
        }
        self.processes: dict[str, subprocess.Popen] = {}
        self.commands: dict[str, tuple[tuple[str, ...], dict | None]] = {}
        """How each process was started (`restart`)."""
        self.logs = self.home / "logs"

    def prefect(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a `prefect` CLI command against this stack's server."""
        command = [sys.executable, "-m", "prefect", "--no-prompt", *args]
        return subprocess.run(command, cwd=PROJECT_DIR, env=self.env, capture_output=True, text=True, check=check)

    def _spawn(self, name: str, *module_and_args: str, env: dict | None = None) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")
        process = subprocess.Popen(
            [sys.executable, "-m", *module_and_args], cwd=PROJECT_DIR, env={**self.env, **(env or {})},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.processes[name] = process
        self.commands[name] = (module_and_args, env)
        return process

    def restart(self, name: str) -> subprocess.Popen:
        """Start a process again as it was started last."""
        module_and_args, env = self.commands[name]
        return self._spawn(name, *module_and_args, env=env)

    def start_server(self, timeout: float = 90) -> None:
        if port_answers(self.port):
            raise PortTaken(f"port {self.port} is taken: a server already answers there; stop it or pick --port")
        self.home.mkdir(parents=True, exist_ok=True)
        self._spawn("server", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"Prefect server did not start on port {self.port}; see {self.logs / 'server.log'}")

    def use_task_storage(self) -> None:
        """Keep stage runs' parameters and results in `task_storage`: a RemoteFileSystem block on the
        server, named in the environment of every process started from now on."""
        block_name = TASK_STORAGE_BLOCK.split("/")[1]
        code = ("import sys; from prefect.filesystems import RemoteFileSystem; from stagediff.gcs import storage_options; "
                f"RemoteFileSystem(basepath=sys.argv[1], settings=storage_options()).save({block_name!r}, overwrite=True)")
        subprocess.run([sys.executable, "-c", code, self.task_storage], cwd=PROJECT_DIR, env=self.env, check=True,
                       capture_output=True)
        self.env.update(dict.fromkeys(TASK_STORAGE_SETTINGS, TASK_STORAGE_BLOCK))

    def create_pools(self) -> None:
        for pool in POOLS:
            self.prefect("work-pool", "create", pool, "--type", "process", "--overwrite")

    def deploy(self) -> None:
        self.prefect("deploy", "--all")

    def start_worker(self, pool: str, env: dict | None = None) -> subprocess.Popen:
        """Start (or restart) the process worker of one pool."""
        limit = ["--limit", str(WORKER_LIMITS[pool])] if WORKER_LIMITS[pool] else []
        return self._spawn(f"worker-{pool}", "prefect", "worker", "start", "--pool", pool, "--type", "process",
                           *limit, env=env)

    def start_stage_worker(self, name: str, stages: str, env: dict | None = None) -> subprocess.Popen:
        """Start a warm stage worker (`tasks.worker`) serving `stages`, logging to logs/<name>.log."""
        return self._spawn(name, "tasks.worker", "--stages", stages, env=env)

    def wait_until_connected(self, *workers: subprocess.Popen, timeout: float = 180) -> None:
        """Wait until these stage worker processes are connected to the server."""
        expected = {f"{socket.gethostname()}-{worker.pid}" for worker in workers}
        deadline = time.monotonic() + timeout
        while not expected <= self._connected_identifiers():
            if time.monotonic() > deadline or any(worker.poll() is not None for worker in workers):
                raise RuntimeError(f"stage workers did not connect in {timeout:.0f}s; see {self.logs}")
            time.sleep(0.5)

    def _connected_identifiers(self) -> set[str]:
        """The connected task workers' identifiers; none while the server is too busy to answer."""
        try:
            return {worker["identifier"] for worker in self.connected_task_workers()}
        except OSError:  # a timed-out request on a loaded machine: ask again
            return set()

    def connected_task_workers(self) -> list[dict]:
        """The task workers the server sees connected (`/task_workers/filter`)."""
        request = urllib.request.Request(f"{self.api_url}/task_workers/filter", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def kill(self, name: str) -> None:
        """Kill a process and everything it started (a worker and its flow-run processes)."""
        process = self.processes.pop(name, None)
        if process and process.poll() is None:
            victims = _with_descendants(process.pid)
            for victim in victims:
                _signal(victim, signal.SIGKILL)
            psutil.wait_procs(victims, timeout=10)

    def start(self, accelerator_workers: int = 1) -> "LocalStack":
        self.start_server()
        if self.task_storage:
            self.use_task_storage()
        self.create_pools()
        self.deploy()
        for pool in POOLS:
            self.start_worker(pool)
        workers = [self.start_stage_worker("stage-encode", STAGE_WORKERS["encode"])]
        for index in range(accelerator_workers):
            workers.append(self.start_stage_worker(f"stage-accelerator-{index}", STAGE_WORKERS["accelerator"]))
        self.wait_until_connected(*workers)
        return self

    def stop(self) -> None:
        """Stop every process started here, and their children (flow runs), the server last."""
        for name in reversed(list(self.processes)):
            process = self.processes.pop(name)
            if process.poll() is None:
                victims = _with_descendants(process.pid)
                for victim in victims:
                    _signal(victim, signal.SIGTERM)
                _, alive = psutil.wait_procs(victims, timeout=10)
                for victim in alive:
                    _signal(victim, signal.SIGKILL)


def _with_descendants(pid: int) -> list[psutil.Process]:
    try:
        process = psutil.Process(pid)
        return [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _signal(process: psutil.Process, signum: int) -> None:
    try:
        process.send_signal(signum)
    except psutil.NoSuchProcess:
        pass


class Supervisor:
    """Starts again the stack's processes that exit, with backoff (`RESTART_*_SECONDS`)."""

    def __init__(self, stack: LocalStack, report=print):
        self.stack, self.report = stack, report
        now = time.monotonic()
        self.up_since = dict.fromkeys(stack.processes, now)
        self.delays: dict[str, float] = {}
        self.due: dict[str, float] = {}
        """Process name -> when to start it again."""

    def check(self) -> None:
        now = time.monotonic()
        for name, process in list(self.stack.processes.items()):
            if name in self.due:
                if now >= self.due[name]:
                    del self.due[name]
                    process = self.stack.restart(name)
                    self.up_since[name] = time.monotonic()
                    self.report(f"{name} started again (pid {process.pid})")
            elif process.poll() is not None:
                up = now - self.up_since.get(name, now)
                last = self.delays.get(name)
                delay = (RESTART_FIRST_SECONDS if last is None or up >= RESTART_RESET_SECONDS
                         else min(RESTART_MAX_SECONDS, 2 * last))
                self.delays[name], self.due[name] = delay, now + delay
                self.report(f"{name} exited with code {process.returncode} after {up:.0f}s up; "
                            f"starting it again in {delay:.0f}s (see {self.stack.logs / (name + '.log')})")


class Stop(Exception):
    """Raised by `main()`'s signal handler, once: later signals must not interrupt the clean-up."""


class _StopOnFirstSignal:
    def __init__(self):
        self.stopping = False

    def __call__(self, signum, frame):
        if not self.stopping:
            self.stopping = True
            raise Stop(signal.Signals(signum).name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=4200)
    parser.add_argument("--home", default=str(PROJECT_DIR / ".prefect-local"), help="PREFECT_HOME for the server")
    parser.add_argument("--accelerator-workers", type=int, default=1,
                        help="warm denoise/decode workers (one per accelerator on a real machine)")
    parser.add_argument("--task-storage", metavar="GS_URI",
                        help="a gs:// folder for stage runs' parameters and results, so that stage workers on "
                             "other machines can join (default: under --home)")
    args = parser.parse_args()
    # Explicit handlers: a background job of a non-interactive shell (`make serve &`, nohup) starts
    # with SIGINT ignored, and SIGTERM (kill, service managers, container runtimes) would otherwise
    # end this process at once and leave the server and the workers running.
    handler = _StopOnFirstSignal()
    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)
    stack = LocalStack(Path(args.home), args.port, task_storage=args.task_storage)
    exit_code = 0
    try:
        stack.start(args.accelerator_workers)
        print(f"Prefect UI: http://127.0.0.1:{stack.port}   (export PREFECT_API_URL={stack.api_url})")
        print(f"Stage workers: encode+score, {args.accelerator_workers} × denoise+decode (warm); process workers on "
              f"{' and '.join(POOLS)}. Start a batch with:")
        print(f"  PREFECT_API_URL={stack.api_url} .venv/bin/prefect deployment run generate/stagediff --watch --params "
              '\'{"model": "demo-models/tiny-sdxl", "prompts": ["a red fox"], "seeds": [0, 1]}\'')
        print(f"Logs: {stack.logs}. Ctrl-C (or kill) stops the server and every worker.", flush=True)
        supervisor = Supervisor(stack, report=lambda line: print(line, file=sys.stderr, flush=True))
        while True:
            supervisor.check()
            time.sleep(0.5)
    except PortTaken as error:
        print(f"Not starting: {error}", file=sys.stderr)
        exit_code = 1
    except Stop as stop:
        print(f"{stop}: stopping the server and the workers.", file=sys.stderr)
    finally:
        handler.stopping = True
        stack.stop()
        # Anything started but not yet recorded when a signal came (a `prefect` command, a process
        # being spawned) is a child of this process too.
        leftovers = _with_descendants(os.getpid())[1:]
        for process in leftovers:
            _signal(process, signal.SIGKILL)
        psutil.wait_procs(leftovers, timeout=10)
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
