"""Start a flow run without paying for its imports: the command the process workers run for our
deployments (`job_variables.command` in prefect.yaml) instead of `python -m prefect.engine`.

It asks the flow host of this machine (`flows.flow_host`, named by STAGEDIFF_FLOW_HOST) to fork a
flow-run process from its interpreter, where Prefect, torch, diffusers and the flows are imported
already, and stands in for that process: it hands over its standard streams, environment and working
directory, passes on the signals it gets (a cancellation's SIGTERM) and exits with the flow run's exit
code. Killed outright, it takes the flow run with it: the host kills a flow run whose launcher is gone
(and a launcher whose host is gone kills its flow run).
Without a host, or with a host of another interpreter, it runs `python -m prefect.engine` itself.

Standard library only: it must start in milliseconds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

HOST_VARIABLE = "STAGEDIFF_FLOW_HOST"
"""The path of the flow host's socket."""
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STREAMS = (0, 1, 2)


def interpreter_identity(environ) -> dict:
    """What a forked process inherits and must match for the run to behave as in a new interpreter:
    the installation and the `PYTHON*` variables (PYTHONPATH decides what `import` finds)."""
    variables = {name: value for name, value in environ.items() if name.startswith("PYTHON")}
    return {"prefix": sys.prefix, "variables": variables}


def send_message(connection: socket.socket, message: dict, fds: tuple[int, ...] = ()) -> None:
    data = json.dumps(message).encode() + b"\n"
    if fds:
        sent = socket.send_fds(connection, [data], list(fds))
        data = data[sent:]
    if data:
        connection.sendall(data)


class MessageReader:
    """Newline-delimited JSON messages from a stream socket, with the file descriptors sent along."""

    def __init__(self, connection: socket.socket):
        self.connection = connection
        self.buffer = b""
        self.fds: list[int] = []

    def read(self) -> dict | None:
        """The next message, or None when the other side has closed the connection."""
        while b"\n" not in self.buffer:
            data, fds, _, _ = socket.recv_fds(self.connection, 65536, 8)
            self.fds += fds
            if not data:
                return None
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)


def run_in_host(path: str) -> int | None:
    """Run the flow run in the host's fork; its exit code, or None when the host did not take it."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(path)
    except OSError:
        return None
    with connection:
        request = {"identity": interpreter_identity(os.environ), "environment": dict(os.environ), "cwd": os.getcwd()}
        reader = MessageReader(connection)
        try:
            send_message(connection, request, STREAMS)
            reply = reader.read()
        except OSError:  # the host closed the connection: it refused the run, or it is stopping
            return None
        if reply is None or "pid" not in reply:
            return None
        flow_run_process = reply["pid"]

        def forward(signum, frame):
            try:
                os.kill(flow_run_process, signum)
            except ProcessLookupError:
                pass

        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, forward)
        reply = reader.read()  # the signals above interrupt it only for their handler (PEP 475)
        if reply is None:  # the host went away: its flow runs must not outlive it unwatched
            forward(signal.SIGKILL, None)
            return 1
        return reply["exit_code"]


def main() -> None:
    path = os.environ.get(HOST_VARIABLE)
    exit_code = run_in_host(path) if path else None
    if exit_code is None:
        os.execv(sys.executable, [sys.executable, "-m", "prefect.engine", *sys.argv[1:]])
    if exit_code < 0:  # the flow run was killed by a signal: end the same way, as the worker expects
        signal.signal(-exit_code, signal.SIG_DFL)
        os.kill(os.getpid(), -exit_code)
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
