"""The flow host: one per machine, it imports Prefect, torch, diffusers and our flows once, then forks a
process for each flow run a process worker starts through `flows.flow_launch`. A flow run still gets a
process of its own (its environment, working directory and streams, killed on cancellation) but
starts at once instead of spending seconds on imports: on `make serve`'s 2-core machine the generate
run's process was ready 5 s after the worker took the run, the same run forked here is ready in a
fraction of a second.

    STAGEDIFF_FLOW_HOST=/run/stagediff/flow-host.sock python -m flows.flow_host

Workers started with the same STAGEDIFF_FLOW_HOST use it. The host stays single-threaded (forking a
process that runs threads can copy a lock some thread held), so it only imports, waits for launchers
and reaps its children. It takes a flow run only from a launcher of the same interpreter and
`PYTHON*` variables (`flow_launch.interpreter_identity`); others run `python -m prefect.engine`.
Code changed on disk reaches flow runs when the host restarts, as with the warm stage workers.
"""

from __future__ import annotations

import argparse
import importlib
import os
import runpy
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass

from flows.flow_launch import HOST_VARIABLE, STREAMS, MessageReader, interpreter_identity, send_message

PRELOADED = ("prefect.engine", "prefect.flow_engine", "flows.generate", "flows.sweep", "flows.stages")
"""What our deployments' flow runs import (their entrypoints), imported once by the host."""
REQUEST_TIMEOUT_SECONDS = 10.0


@dataclass
class FlowRunRequest:
    """What a launcher hands over: the flow-run process's environment and working directory."""

    environment: dict[str, str]
    cwd: str


class FlowHost:
    """Accepts launchers on a Unix socket and forks a flow-run process for each. `serve()` returns
    only in a forked child, with the request it must run."""

    def __init__(self, path: str):
        self.path = path
        self.identity = interpreter_identity(os.environ)
        self.launchers: dict[int, socket.socket] = {}
        """Each flow-run process's launcher connection, by pid."""

    def serve(self) -> FlowRunRequest:
        self.listener = _listen(self.path)
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_write, False)
        signal.set_wakeup_fd(self.wake_write)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # a handler, so the wakeup fd hears it
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.selector.register(self.wake_read, selectors.EVENT_READ)
        print(f"Flow host ready on {self.path} (pid {os.getpid()})", flush=True)
        while True:
            for key, _ in self.selector.select():
                if key.fileobj is self.listener:
                    request = self._accept()
                    if request is not None:
                        return request  # in the child
                elif key.fileobj == self.wake_read:
                    os.read(self.wake_read, 4096)
                    self._reap()
                else:
                    self._hear_launcher(key.fileobj, key.data)

    def _accept(self) -> FlowRunRequest | None:
        connection, _ = self.listener.accept()
        connection.settimeout(REQUEST_TIMEOUT_SECONDS)
        reader = MessageReader(connection)
        try:
            message = reader.read()
        except (OSError, ValueError) as error:
            print(f"Dropped a launcher: {error}", flush=True)
            message = None
        if message is None or message.get("identity") != self.identity:
            if message is not None:
                send_message(connection, {"refused": "another interpreter or PYTHON* variables"})
            _close_all(reader.fds)
            connection.close()
            return None
        pid = os.fork()
        if pid == 0:
            self._become_flow_run(connection, reader.fds)
            return FlowRunRequest(message["environment"], message["cwd"])
        _close_all(reader.fds)
        send_message(connection, {"pid": pid})
        self.launchers[pid] = connection
        self.selector.register(connection, selectors.EVENT_READ, data=pid)
        flow_run = message["environment"].get("PREFECT__FLOW_RUN_ID", "?")
        print(f"{time.strftime('%H:%M:%S')} flow run {flow_run} in pid {pid}", flush=True)
        return None

    def _become_flow_run(self, connection: socket.socket, fds: list[int]) -> None:
        """In the child: drop the host's sockets and its SIGCHLD handling, take the launcher's streams."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self.selector.close()
        for launcher in [*self.launchers.values(), connection, self.listener]:
            launcher.close()
        _close_all([self.wake_read, self.wake_write])
        for target, fd in zip(STREAMS, fds):
            os.dup2(fd, target)
        _close_all(fds)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            exit_code = os.waitstatus_to_exitcode(status)
            print(f"{time.strftime('%H:%M:%S')} pid {pid} exited with {exit_code}", flush=True)
            connection = self.launchers.pop(pid, None)
            if connection is not None:
                if connection.fileno() in self.selector.get_map():
                    self.selector.unregister(connection)
                try:
                    send_message(connection, {"exit_code": exit_code})
                except OSError:
                    pass
                connection.close()

    def _hear_launcher(self, connection: socket.socket, pid: int) -> None:
        """A launcher says nothing after its request: a closed connection means it was killed, and so
        is its flow run."""
        try:
            closed = not connection.recv(4096)
        except OSError:
            closed = True
        if closed:
            self.selector.unregister(connection)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _listen(path: str) -> socket.socket:
    """A listening socket at `path`, replacing a stale one; fails when a live host holds it."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        if os.path.exists(path):
            os.unlink(path)
    else:
        probe.close()
        raise SystemExit(f"{path}: another flow host is serving there")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    return listener


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def run_flow_run(request: FlowRunRequest) -> None:
    """What `python -m prefect.engine` does, in the environment and directory the launcher had."""
    os.chdir(request.cwd)
    os.environ.clear()
    os.environ.update(request.environment)
    sys.argv = ["prefect.engine"]
    # Prefect read its settings at import, in the host's environment: read them again in the run's.
    from prefect.context import SettingsContext, get_settings_context
    from prefect.settings import Settings

    with SettingsContext(profile=get_settings_context().profile, settings=Settings()):
        runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", default=os.environ.get(HOST_VARIABLE),
                        help=f"the socket's path (default: ${HOST_VARIABLE})")
    args = parser.parse_args()
    if not args.socket:
        parser.error(f"give --socket or set {HOST_VARIABLE}")
    for module in PRELOADED:
        importlib.import_module(module)
    request = FlowHost(args.socket).serve()
    run_flow_run(request)


if __name__ == "__main__":
    main()
