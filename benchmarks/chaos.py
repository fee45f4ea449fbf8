"""Faults survived, measured: one batch on a warm local stack (`flows.local_stack`, two accelerator
workers) per fault, each fault injected once the batch has finished its first item, against the same
batch with no fault. Before the first batch, and whenever workers had to be started again after a
fault, a small untimed batch warms the workers (their model loads are not counted against a fault).

    python benchmarks/chaos.py [--items 24] [--steps 40] [--outage 60] [--faults NAME,...]

For each fault: whether the batch completed (a cancelled batch is run again: that run must complete),
items lost (no media at the end: must be 0), finished items recomputed (their latents or media written
again after the fault), and wall time from the start of the batch to its end. Writes
benchmarks/results/<date>-<host>-chaos.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
from prefect.client.orchestration import SyncPrefectClient  # noqa: E402
from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter  # noqa: E402
from prefect.states import Cancelling  # noqa: E402

from flows.local_stack import STAGE_WORKERS, LocalStack  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ACCELERATORS = ("stage-accelerator-0", "stage-accelerator-1")
BATCH_TIMEOUT = 3600


@dataclass
class Outcome:
    fault: str
    completed: bool
    items: int
    lost: int
    recomputed: int
    seconds: float
    note: str = ""


class Chaos:
    """Runs a batch on `stack` per fault; `stack` serves denoise+decode with the workers named in
    `accelerators`."""

    def __init__(self, stack: LocalStack, model: Path, work: Path, items: int, steps: int, outage: float,
                 accelerators=ACCELERATORS):
        self.stack, self.model, self.work = stack, model, work
        self.items, self.steps, self.outage = items, steps, outage
        self.accelerators = accelerators

    def parameters(self, store: Path, items: int | None = None) -> dict:
        seeds = f"0-{(items or self.items) - 1}"
        return {"model": str(self.model), "prompts": ["a lighthouse at dawn"], "seeds": [seeds],
                "steps": self.steps, "height": 64, "width": 64, "store": str(store), "dispatch": "warm"}

    def warm_up(self) -> None:
        """An untimed batch of one item per unit, two units per accelerator worker, so that every worker
        has loaded the model (the scheduler fans units out over the workers)."""
        store = self.work / f"warm-up-{time.monotonic_ns()}"
        parameters = {**self.parameters(store, items=2 * len(self.accelerators)), "unit_items": 1}
        before = time.time()
        self.stack.prefect("deployment", "run", "generate/stagediff", "--params", json.dumps(parameters))
        if not self._final_state(self._run_of(store, since=before)).is_completed():
            raise RuntimeError("the warm-up batch did not complete; see the stack's logs")

    # -- the faults: each is called once the batch has finished its first item ----------------------
    def worker_killed_and_replaced(self, run_id):
        self.stack.kill(self.accelerators[0])
        self.stack.start_stage_worker(self.accelerators[0], STAGE_WORKERS["accelerator"])

    def worker_lost_for_good(self, run_id):
        self.stack.kill(self.accelerators[-1])

    def every_accelerator_gone_then_back(self, run_id):
        for name in self.accelerators:
            self.stack.kill(name)
        time.sleep(self.outage)
        for name in self.accelerators:
            self.stack.start_stage_worker(name, STAGE_WORKERS["accelerator"])

    def server_restarted(self, run_id):
        self.stack.kill("server")
        self.stack.start_server()

    def generate_process_killed(self, run_id):
        worker = psutil.Process(self.stack.processes["worker-cpu-pool"].pid)
        for process in worker.children(recursive=True):
            if "prefect.engine" in " ".join(process.cmdline()):
                process.kill()

    def cancelled(self, run_id):
        with self.client() as client:
            client.set_flow_run_state(run_id, Cancelling(), force=True)

    FAULTS = ("no_fault", "worker_killed_and_replaced", "worker_lost_for_good", "every_accelerator_gone_then_back",
              "server_restarted", "generate_process_killed", "cancelled")

    # -- one batch -----------------------------------------------------------------------------------
    def client(self) -> SyncPrefectClient:
        return SyncPrefectClient(self.stack.api_url)

    def run(self, fault: str) -> Outcome:
        store = self.work / fault
        parameters = self.parameters(store)
        started = time.monotonic()
        before = time.time()
        self.stack.prefect("deployment", "run", "generate/stagediff", "--params", json.dumps(parameters))
        run_id = self._run_of(store, since=before)
        note = ""
        if fault != "no_fault":
            self._wait(lambda: list(store.glob("media/*.png")), "a first item")
            getattr(self, fault)(run_id)
        done_at_fault = self._written(store)
        state = self._final_state(run_id)
        if fault == "generate_process_killed":
            resumed = self._wait(lambda: self._run_of(store, since=before, resumed=1, wait=False), "the resumed run")
            state, note = self._final_state(resumed), "resumed by the automation"
        if fault == "cancelled" and state.is_cancelled():
            # Cancelled as asked; the same batch run again finishes the rest.
            again = time.time()
            self.stack.prefect("deployment", "run", "generate/stagediff", "--params", json.dumps(parameters))
            state, note = self._final_state(self._run_of(store, since=again)), "cancelled, then run again"
        seconds = time.monotonic() - started
        after = self._written(store)
        recomputed = sum(1 for path, mtime in done_at_fault.items() if after.get(path) != mtime)
        lost = self.items - len(list(store.glob("media/*.png")))
        self._restore()
        return Outcome(fault, state.is_completed(), self.items, lost, recomputed, round(seconds, 1), note)

    def _run_of(self, store: Path, since: float, resumed: int = 0, wait: bool = True):
        def find():
            with self.client() as client:
                runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["generate"])))
            return next((run.id for run in runs if run.parameters.get("store") == str(store)
                         and run.parameters.get("resumed", 0) == resumed
                         and run.created.timestamp() >= since - 1), None)
        return self._wait(find, "the generate run") if wait else find()

    def _final_state(self, run_id):
        def final():
            if self.stack.processes["server"].poll() is not None:
                raise RuntimeError("the Prefect server exited (not a fault of this benchmark's); see its log")
            try:
                with self.client() as client:
                    state = client.read_flow_runs(flow_run_filter=FlowRunFilter(id={"any_": [run_id]}))[0].state
            except Exception:  # the server is restarting
                return None
            return state if state and state.is_final() else None
        return self._wait(final, "the batch to end", BATCH_TIMEOUT)

    @staticmethod
    def _written(store: Path) -> dict[str, int]:
        return {str(p.relative_to(store)): p.stat().st_mtime_ns for folder in ("latents", "media")
                for p in (store / folder).rglob("*") if p.is_file()}

    @staticmethod
    def _wait(condition, what: str, timeout: float = 600):
        deadline = time.monotonic() + timeout
        while not (value := condition()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(0.5)
        return value

    def _restore(self):
        """Every accelerator worker up again for the next fault."""
        missing = [name for name in self.accelerators if name not in self.stack.processes
                   or self.stack.processes[name].poll() is not None]
        workers = [self.stack.start_stage_worker(name, STAGE_WORKERS["accelerator"]) for name in missing]
        if workers:
            self.stack.wait_until_connected(*workers)
            self.warm_up()


def table(outcomes: list[Outcome]) -> str:
    baseline = next((o.seconds for o in outcomes if o.fault == "no_fault"), None)
    lines = ["| fault | completed | items lost | finished items recomputed | wall time (s) | vs no fault | note |",
             "|---|---|---|---|---|---|---|"]
    for o in outcomes:
        ratio = f"{o.seconds / baseline:.2f}×" if baseline else "-"
        lines.append(f"| {o.fault} | {'yes' if o.completed else 'NO'} | {o.lost} of {o.items} | {o.recomputed} | "
                     f"{o.seconds:.1f} | {ratio} | {o.note} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=24)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--outage", type=float, default=60.0, help="seconds every accelerator worker stays gone")
    parser.add_argument("--faults", default=",".join(Chaos.FAULTS))
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # stop the stack on the way out
    from stagediff.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="stagediff-chaos-"))
    model = build_tiny_model("sdxl", work / "model")
    stack = LocalStack(work / "prefect", extra_env={"PREFECT_UI_ENABLED": "false"})
    try:
        stack.start(accelerator_workers=len(ACCELERATORS))
        chaos = Chaos(stack, model, work / "stores", args.items, args.steps, args.outage)
        chaos.warm_up()
        outcomes = []
        for fault in args.faults.split(","):
            outcomes.append(chaos.run(fault))
            print(table(outcomes).splitlines()[-1], flush=True)
    finally:
        stack.stop()
    stem = RESULTS / f"{datetime.date.today()}-{socket.gethostname()}-chaos"
    stem.with_suffix(".json").write_text(json.dumps({"items": args.items, "steps": args.steps, "outage": args.outage,
                                                     "outcomes": [asdict(o) for o in outcomes]}, indent=2))
    stem.with_suffix(".md").write_text(f"# Chaos: {args.items} items, {args.steps} steps, tiny SDXL, two accelerator "
                                       f"workers ({socket.gethostname()})\n\n{table(outcomes)}\n")
    print(table(outcomes))


if __name__ == "__main__":
    main()
