"""What the benchmark sections share: the benchmarked cases, workloads run in processes of their own,
the random-init models, pixel comparisons, `make serve`'s setup with timed batches, the CLI as a user
runs it, and the report's tables and files."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "work"
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

PROMPTS = ["a lighthouse on a cliff at dawn", "a red fox in fresh snow", "a bowl of ramen, studio light",
           "an astronaut riding a horse"]


@dataclass(frozen=True)
class Case:
    """One benchmarked generation: which random-init model (`stagediff tiny-model` name and scale) and
    the settings of each item."""

    model: str
    scale: str
    steps: int
    height: int
    width: int
    frames: int | None = None
    anchor: str = ""
    """A published or reference timing to read the result against."""

    @property
    def size(self) -> str:
        return f"{self.width}×{self.height}" + (f"×{self.frames}f" if self.frames else "")

    def label(self, dtype: str | None = None) -> str:
        """The model as the tables name it: `sdxl (small)`, `sdxl (full, bfloat16)`."""
        return f"{self.model} ({self.scale}{f', {dtype}' if dtype else ''})"

    def arguments(self) -> dict:
        return {"steps": self.steps, "height": self.height, "width": self.width, "frames": self.frames}


# Compute-dominated CPU settings per family.
FULL = {
    "sdxl": Case("sdxl", "small", 6, 224, 224),
    "flux1": Case("flux1", "small", 4, 224, 224),
    "flux2": Case("flux2", "small", 4, 224, 224),
    "flux2-klein": Case("flux2-klein", "small", 4, 224, 224),
    "wan": Case("wan", "small", 6, 64, 64, 17),
}
QUICK = {"sdxl": Case("sdxl", "tiny", 2, 64, 64)}


def work_path(*parts: str) -> Path:
    """A path under WORK, read when called (tests point WORK at a temporary folder)."""
    return WORK.joinpath(*parts)


def run_workload(name: str, args: dict, env: dict | None = None) -> dict:
    return run_workloads_at_once(name, [args], env)[0]


def run_workloads_at_once(name: str, each_args: list[dict], env: dict | None = None) -> list[dict]:
    """Run one process of workload `name` per argument set, all at the same time; their measurements.
    Their output goes to files, so that no process blocks on a full pipe while another is waited for."""
    with contextlib.ExitStack() as files:
        outputs = [(files.enter_context(tempfile.TemporaryFile("w+")), files.enter_context(tempfile.TemporaryFile("w+")))
                   for _ in each_args]
        processes = [subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "workloads.py"), name, json.dumps(args)],
                                      stdout=stdout, stderr=stderr, text=True, env={**os.environ, **(env or {})}, cwd=ROOT)
                     for args, (stdout, stderr) in zip(each_args, outputs)]
        results = []
        for process, (stdout, stderr) in zip(processes, outputs):
            process.wait()
            stdout.seek(0)
            stderr.seek(0)
            if process.returncode != 0:
                raise RuntimeError(f"workload {name} failed:\n{stderr.read()[-3000:]}")
            results.append(json.loads(stdout.read().strip().splitlines()[-1]))
        return results


def model_folder(name: str, scale: str) -> str:
    """The random-init checkpoint, built once; `full` models on the accelerator in bf16 (a FLUX.1
    transformer is 24 GB even so)."""
    from stagediff.tiny import build_tiny_model

    folder = WORK / "models" / f"{name}-{scale}"
    if not (folder / "model_index.json").exists():
        with bf16_on_accelerator() if scale == "full" else contextlib.nullcontext():
            build_tiny_model(name, folder, scale)
    return str(folder)


@contextlib.contextmanager
def bf16_on_accelerator():
    """New tensors in bf16 on the torch device (the GPU when there is one)."""
    import torch

    from stagediff.backends import torch_device

    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(torch_device()):
            yield
    finally:
        torch.set_default_dtype(default_dtype)


def read_frames(path: str) -> np.ndarray:
    import imageio.v3 as iio

    data = Path(path).read_bytes()
    return iio.imread(data, extension=Path(path).suffix)


def pixel_diff(ours: str, theirs: str) -> int:
    """The largest difference, in 8-bit levels, between two media files' pixels."""
    return int(np.abs(read_frames(ours).astype(int) - read_frames(theirs).astype(int)).max())


def side_by_side(family: str, case: Case, prompts: int, seeds: int, dtype: str = "float32") -> tuple[dict, dict, int]:
    """Run the plain diffusers loop and stagediff's stages on the same items; return both measurements
    and the largest pixel difference between their outputs."""
    base = {"model": model_folder(case.model, case.scale), "prompts": PROMPTS[:prompts], "seeds": list(range(seeds)),
            "dtype": dtype, **case.arguments()}
    store = WORK / "stores" / family
    plain_out = WORK / "plain" / family
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(plain_out, ignore_errors=True)
    plain = run_workload("plain_loop", {**base, "out": str(plain_out)})
    staged = run_workload("staged", {**base, "store": str(store), "batch_size": 1})
    extension = "mp4" if case.frames else "png"
    theirs = [plain_out / f"{p_index}-{seed}.{extension}" for p_index in range(prompts) for seed in range(seeds)]
    diffs = [pixel_diff(ours, str(path)) for ours, path in zip(staged["media"], theirs)]
    return plain, staged, max(diffs)


class Stack:
    """`make serve`'s setup (flows.local_stack) for a benchmark, with batches timed as users start them."""

    def __init__(self, name: str, accelerator_workers: int = 1):
        from flows.local_stack import LocalStack

        self.name = name
        shutil.rmtree(WORK / f"prefect-{name}", ignore_errors=True)
        self.local = LocalStack(WORK / f"prefect-{name}", extra_env={"PREFECT_UI_ENABLED": "false"})
        self.accelerator_workers = accelerator_workers
        self.setup_seconds = 0.0

    def __enter__(self) -> "Stack":
        start = time.perf_counter()
        try:
            self.local.start(self.accelerator_workers)
        except BaseException:
            self.local.stop()
            raise
        self.setup_seconds = time.perf_counter() - start
        return self

    def __exit__(self, *exc) -> None:
        self.local.stop()

    def run_batch(self, parameters: dict, label: str, since: float | None = None) -> dict:
        """`prefect deployment run generate/stagediff --watch` on a fresh store: seconds (from `since`,
        default now) to the first image, to the end of the batch (its flow run's end on the server) and
        to the command's exit (`--watch` waits 3 s more for straggling logs); seconds from the command's
        start to the first dispatch of a stage (the creation of the flow run's first stage task run)."""
        store = WORK / "stores" / f"{self.name}-{label}"
        shutil.rmtree(store, ignore_errors=True)
        cpu_before = self.cpu_seconds() + children_cpu_seconds()
        launched = time.perf_counter()
        start = since or launched
        clock_offset = time.time() - time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "prefect", "--no-prompt", "deployment", "run",
                                    "generate/stagediff", "--params", json.dumps({**parameters, "store": str(store)}),
                                    "--watch"], env=self.local.env, cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        output = []
        reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
        reader.start()
        first_item = None
        while process.poll() is None:
            if first_item is None and list(store.glob("media/*")):
                first_item = time.perf_counter() - start
            time.sleep(0.1)
        watch_exit = time.perf_counter() - start
        reader.join()
        cpu_seconds = self.cpu_seconds() + children_cpu_seconds() - cpu_before
        ended, first_dispatch = self.flow_run_times("".join(output))
        return {"wall_s": ended - clock_offset - start if ended else watch_exit, "watch_exit_s": watch_exit,
                "first_item_s": first_item, "ok": process.returncode == 0, "cpu_s": cpu_seconds,
                "first_dispatch_s": first_dispatch - clock_offset - launched if first_dispatch else None}

    def flow_run_times(self, output: str) -> tuple[float | None, float | None]:
        """When the flow run that `prefect deployment run` printed (its UUID) ended, and when its first
        stage task run was created, in epoch seconds (None for what the server does not have)."""
        from prefect import settings
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter

        from stagediff.plan import DECODE, DENOISE, ENCODE

        found = re.search(r"UUID: ([0-9a-f-]{36})", output)
        if not found:
            return None, None
        with settings.temporary_settings({settings.PREFECT_API_URL: self.local.api_url}):
            with get_client(sync_client=True) as client:
                flow_run = client.read_flow_run(UUID(found.group(1)))
                task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run.id]}))
        # Stage task runs are named after their stage: `denoise-…`, or `denoise-on-pool` for deployments.
        created = [run.created for run in task_runs if run.name.split("-")[0] in (ENCODE, DENOISE, DECODE)]
        return (flow_run.end_time.timestamp() if flow_run.end_time else None,
                min(created).timestamp() if created else None)

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the stack's processes (server, workers) and their children, those
        alive (flow runs in progress) and those they waited for."""
        import psutil

        total = 0.0
        for process in self.local.processes.values():
            try:
                root = psutil.Process(process.pid)
                times = root.cpu_times()
                total += times.children_user + times.children_system
                for member in [root, *root.children(recursive=True)]:
                    times = member.cpu_times()
                    total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total


def children_cpu_seconds() -> float:
    """CPU seconds of this process's children that have ended (commands it ran)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cli_generate(batch: dict, store: Path, fresh: bool = True) -> tuple[float, float]:
    """Wall and CPU seconds of `stagediff generate` for the batch, in-process, as a user runs it (in an
    emptied store unless not `fresh`), with the batch's `batch_size` (default 1: the CLI's own default is
    auto)."""
    if fresh:
        shutil.rmtree(store, ignore_errors=True)
    command = [sys.executable, "-m", "stagediff.cli", "generate", "--model", batch["model"], "--store", str(store),
               "--steps", str(batch["steps"]), "--height", str(batch["height"]), "--width", str(batch["width"]),
               "--batch-size", str(batch.get("batch_size", 1))]
    for prompt in batch["prompts"]:
        command += ["--prompt", prompt]
    for seed in batch["seeds"]:
        command += ["--seed", str(seed)]
    start, cpu_before = time.perf_counter(), children_cpu_seconds()
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start, children_cpu_seconds() - cpu_before


def measure_table(title: str, measures: dict, unit: str = "value") -> list[str]:
    """A section of single measures: one row per measure, floats to two decimals."""
    lines = [f"## {title}", "", f"| measure | {unit} |", "|---|---|"]
    return lines + [f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in measures.items()]


def save_report(report: dict, suffix: str, table: str) -> None:
    """Write results/<date>-<host><suffix>.json and .md, and print the table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{report['date']}-{socket.gethostname()}{suffix}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"\nwritten: {stem}.json, {stem}.md")
