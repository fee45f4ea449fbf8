"""`make bench`: stagediff against a plain diffusers loop, where the time goes, stage memory, compile
reuse, orchestration overhead. Writes benchmarks/results/<date>-<host>.json and .md and prints the table.

    python benchmarks/run.py [--quick | --gpu-only [--gpu-families sdxl,flux1,wan] | --real-memory | --cpu-scaling
                              | --warm | --decode | --step-cache | --cli]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

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
# Real-size architectures (random weights, bf16) for peak memory on this machine: one step at a small
# size, so that the weights dominate, as they do at real sizes. FLUX.1 (34 GB in bf16) needs more RAM.
REAL_MEMORY = {"sdxl": Case("sdxl", "full", 1, 256, 256), "wan": Case("wan", "full", 1, 96, 96, 5)}
# Real-size architectures (random weights, bf16) on a GPU, with the anchors from the issue and the
# reference systems' READMEs.
GPU = {
    "sdxl": Case("sdxl", "full", 25, 1024, 1024, anchor="TPU v6e-8 reference (torchax): UNet 25 steps ≈ 2.2 s "
                 "(0.09 s/step), VAE decode ≈ 0.5 s"),
    "flux1": Case("flux1", "full", 28, 1024, 1024, anchor="published: FLUX.1-dev 1024², 28 steps ≈ 4.3 s on one "
                  "H100 with torch.compile"),
    "wan": Case("wan", "full", 50, 480, 832, 81, anchor="TPU v6e-8 reference: Wan 2.1 14B (10× the parameters) "
                "480p 81 frames ≈ 1.26-1.37 s/step"),
}

# Section 10, step caching: one item per setting (each setting reruns the whole denoise loop) with enough
# steps for the caches to act. These random-weight models change far more per step than trained ones (the
# first block's residual by 40-50% for flux1, ~20% for wan, against a few % for trained models), so
# fbcache's thresholds are set for them: each family's first skips some steps, its second most.
STEP_CACHE = {
    "flux1": Case("flux1", "small", 12, 128, 128),
    "flux2-klein": Case("flux2-klein", "small", 12, 128, 128),
    "wan": Case("wan", "small", 12, 64, 64, 9),
}
STEP_CACHE_SETTINGS = {
    "flux1": ("fbcache:0.45", "fbcache:0.6", "magcache", "magcache:0.25", "taylorseer:3", "taylorseer",
              "taylorseer-attention"),
    # FLUX.2's First Block Cache fails inside diffusers 0.42 (stagediff refuses it).
    "flux2-klein": ("magcache", "magcache:0.25", "taylorseer:3", "taylorseer", "taylorseer-attention"),
    # TaylorSeer's attention caching finds no attention modules in Wan (stagediff refuses it).
    "wan": ("fbcache:0.2", "fbcache:0.3", "magcache", "magcache:0.25", "taylorseer:3", "taylorseer"),
}


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


def sweep(family: str, case: Case, prompts: int, seeds: int) -> dict:
    plain, staged, max_diff = side_by_side(family, case, prompts, seeds)
    images = prompts * seeds
    stage_seconds = {name: round(s["seconds"], 2) for name, s in staged["stages"].items()}
    compute = sum(s["compute_seconds"] for s in staged["stages"].values())
    loads = sum(s["load_seconds"] for s in staged["stages"].values())
    encode_per_prompt = staged["stages"]["encode"]["compute_seconds"] / prompts
    return {
        "family": family, "model": case.label(), "images": images, "steps": case.steps,
        "size": case.size, "plain_images_per_s": images / plain["seconds"],
        "stagediff_images_per_s": images / staged["seconds"], "ratio": plain["seconds"] / staged["seconds"],
        # The ratio if the encode calls it skips were stagediff's only saving: the loop's time over the
        # loop's time less those calls (timed by stagediff's encode, the same encoder and prompts).
        "reuse_ceiling": plain["seconds"] / (plain["seconds"] - (images - prompts) * encode_per_prompt),
        "max_pixel_diff": max_diff, "stage_seconds": stage_seconds, "model_load_seconds": round(loads, 2),
        "compute_seconds": round(compute, 2), "store_and_other_seconds": round(staged["seconds"] - compute - loads, 2),
        "encode_calls": {"stagediff": staged["stages"]["encode"]["computed"], "plain_loop": plain["encode_calls"]},
    }


def memory(family: str, case: Case, dtype: str = "float32") -> dict:
    base = {"model": model_folder(case.model, case.scale), "prompts": PROMPTS[:1], "seeds": [0], "dtype": dtype,
            "store": str(WORK / "stores" / f"memory-{family}-{case.scale}"), **case.arguments()}
    shutil.rmtree(base["store"], ignore_errors=True)
    peaks = {name: run_workload("stage", {**base, "stage": name})["max_rss_mb"]
             for name in ("encode", "denoise", "decode")}
    full = run_workload("full_pipeline", {**base, "out": str(WORK / "plain" / f"memory-{family}-{case.scale}")})
    return {"family": family, "model": case.label(dtype), "size": case.size,
            **{k: round(v) for k, v in peaks.items()}, "full_pipeline": round(full["max_rss_mb"])}


def cpu_scaling(family: str, case: Case, items: int = 4) -> dict:
    """Section 7: one process on all cores against one single-thread process per core, each denoising its
    share of the same items at the same time. The second is what fanning a sweep out over the cores
    would give a CPU pool; the pixel difference says whether it keeps the images."""
    cores = os.cpu_count() or 1
    base = {"model": model_folder(case.model, case.scale), "prompts": PROMPTS[:1], **case.arguments()}
    stores = WORK / "stores" / f"scaling-{family}"
    shutil.rmtree(stores, ignore_errors=True)
    together = run_workload("staged", {**base, "seeds": list(range(items)), "threads": cores,
                                       "store": str(stores / "together")})
    processes = min(cores, items)
    shares = [list(range(first, items, processes)) for first in range(processes)]
    apart = run_workloads_at_once("staged", [{**base, "seeds": seeds, "threads": 1, "store": str(stores / f"share-{i}")}
                                             for i, seeds in enumerate(shares)])
    together_seconds = together["stages"]["denoise"]["compute_seconds"]
    apart_seconds = max(result["stages"]["denoise"]["compute_seconds"] for result in apart)
    media_apart = {seed: uri for seeds, result in zip(shares, apart) for seed, uri in zip(seeds, result["media"])}
    diffs = [pixel_diff(uri, media_apart[seed]) for seed, uri in enumerate(together["media"])]
    return {"family": family, "model": case.label(), "items": items, "size": case.size,
            "one_process_s_per_item": together_seconds / items, "per_core_processes_s_per_item": apart_seconds / items,
            "fan_out_ratio": together_seconds / apart_seconds, "max_pixel_diff": max(diffs)}


def decode_section() -> dict:
    """Section 9: the decode stage on torchax against torch, the Wan VAE's programs, tiled memory."""
    return {"backends": [decode_backends(family, case) for family, case in FULL.items()],
            # No persistent cache: each run compiles (the per-frame programs do not depend on the frame count).
            "wan_programs": [run_workload("wan_vae_programs", {"mode": mode, "latent_frames": frames, "size": 32},
                                          {"STAGEDIFF_COMPILE_CACHE": "off"}) | {"mode": mode, "latent_frames": frames}
                             for frames in WAN_LATENT_FRAMES for mode in ("torch", "frame", "whole")],
            "tiled_memory": [run_workload("vae_memory", {"size": TILED_MEMORY[0], "tile": tile}) | {"tile": tile}
                             for tile in (None, TILED_MEMORY[1])]}


WAN_LATENT_FRAMES = (5, 21)
"""17 and 81 video frames."""
TILED_MEMORY = (1024, 512)
"""The real SDXL VAE at 1024² (two minutes or more per decode on 2 cores), in one piece and in 512² tiles."""


def decode_backends(family: str, case: Case, items: int = 3) -> dict:
    """The same stored latents decoded by the torch backend and by torchax, the latter in a process with
    an empty compile cache (cold) and in one with the first's cache."""
    base = {"model": model_folder(case.model, case.scale), "prompts": PROMPTS[:1], "seeds": list(range(items)),
            **case.arguments(), "steps": 1}
    stores = WORK / "stores" / f"decode-{family}"
    cache = WORK / "decode-cache" / family
    shutil.rmtree(stores, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    plain = run_workload("staged", {**base, "store": str(stores / "torch")})
    runs = {}
    for name in ("cold", "cached"):
        shutil.copytree(stores / "torch", stores / name, ignore=shutil.ignore_patterns("media"))
        runs[name] = run_workload("decode_only", {**base, "store": str(stores / name), "backend": "torchax"},
                                  {"STAGEDIFF_COMPILE_CACHE": str(cache)})
    warm = lambda seconds: float(np.median(seconds[1:]))  # noqa: E731 - the first item pays the compilation
    return {"family": family, "model": case.label(), "size": case.size,
            "torch_s_per_item": warm(plain["stages"]["decode"]["item_seconds"]),
            "torchax_s_per_item": warm(runs["cold"]["item_seconds"]), "programs": runs["cold"]["compiles"],
            "cold_compile_s": runs["cold"]["compile_seconds"], "cached_compile_s": runs["cached"]["compile_seconds"],
            "cache_hits": runs["cached"]["cache_hits"],
            "max_pixel_diff": max(pixel_diff(a, b) for a, b in zip(plain["media"], runs["cold"]["media"]))}


def step_cache(family: str, case: Case, settings: tuple[str, ...]) -> list[dict]:
    """Section 10: the denoise time and the pixels of each cache setting against the exact run (`none`) of the
    same item, in one process."""
    store = WORK / "stores" / f"step-cache-{family}"
    shutil.rmtree(store, ignore_errors=True)
    # One thread, timed by the process's CPU time: on a shared machine, wall-clock time (and the CPU time of
    # several threads, which spin while they wait for each other) depends on what else runs.
    measured = run_workload("cached_denoise", {
        "model": model_folder(case.model, case.scale), "prompts": PROMPTS[:1], "seeds": [0], "other_seed": 1000,
        "threads": 1, "store": str(store), "caches": ["none", *settings], **case.arguments()})
    exact = measured["none"]
    rows = []
    for setting in settings:
        cached = measured[setting]
        ours = np.concatenate([read_frames(uri) for uri in cached["media"]]).astype(float)
        theirs = np.concatenate([read_frames(uri) for uri in exact["media"]]).astype(float)
        mse = float(np.mean((ours - theirs) ** 2))
        rows.append({"family": family, "model": case.label(), "steps": case.steps, "size": case.size,
                     "cache": setting, "exact_cpu_s": exact["denoise_cpu_seconds"], "cpu_s": cached["denoise_cpu_seconds"],
                     "speedup": exact["denoise_cpu_seconds"] / cached["denoise_cpu_seconds"],
                     "wall_speedup": exact["denoise_seconds"] / cached["denoise_seconds"],
                     "block_work": cached["block_work"] / exact["block_work"],
                     "psnr_db": float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse),
                     "mean_abs_error": float(np.mean(np.abs(ours - theirs)))})
    return rows


def compile_reuse() -> dict:
    base = {"model": model_folder("sdxl", "tiny"), "prompts": PROMPTS[:1], "seeds": [0],
            "store": str(WORK / "stores" / "compile"), **QUICK["sdxl"].arguments()}
    cache = WORK / "compile-cache"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(base["store"], ignore_errors=True)
    env = {"STAGEDIFF_COMPILE_CACHE": str(cache)}
    cold = run_workload("compile_times", base, env)
    shutil.rmtree(base["store"], ignore_errors=True)
    cached = run_workload("compile_times", base, env)
    return {"cold_compile_s": cold["first_compile_seconds"], "warm_in_process_item_s": cold["warm_item_seconds"],
            "warm_in_process_new_compiles": cold["warm_compiles"], "new_process_with_cache_compile_s":
            cached["first_compile_seconds"], "cache_hits_new_process": cached["cache_hits"]}


def orchestration(pooled: bool) -> dict:
    base = {"model": model_folder("sdxl", "tiny"), "prompts": PROMPTS[:2], "seeds": [0, 1, 2, 3],
            **QUICK["sdxl"].arguments()}
    items = 8
    results = {}
    for name, workload in (("library", "staged"), ("in_process_flow", "flow_in_process")):
        store = WORK / "stores" / f"orchestration-{name}"
        shutil.rmtree(store, ignore_errors=True)
        measured = run_workload(workload, {**base, "store": str(store)})
        results[f"{name}_s_per_item"] = measured["seconds"] / items
        if "server_start_seconds" in measured:
            results["ephemeral_api_start_s"] = measured["server_start_seconds"]
    if pooled:
        results.update(pooled_paths(base, items))
    return results


def pooled_paths(base: dict, items: int) -> dict:
    """The batch as a `generate` deployment run on `make serve`'s setup, ephemeral (a flow run per stage
    and chunk) and warm (stage workers, models loaded by an earlier batch)."""
    with Stack("orchestration") as stack:
        ephemeral = stack.run_batch({**base, "dispatch": "deployments"}, "pooled")
        stack.run_batch({**base, "seeds": [9], "dispatch": "warm"}, "warm-up")
        warm = stack.run_batch({**base, "dispatch": "warm"}, "warm")
    return {"pooled_setup_s": stack.setup_seconds, "pooled_s_per_item": ephemeral["wall_s"] / items,
            "pooled_first_item_s": ephemeral["first_item_s"], "warm_s_per_item": warm["wall_s"] / items,
            "warm_first_item_s": warm["first_item_s"], "pooled_runs_ok": ephemeral["ok"] and warm["ok"]}


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
        to the command's exit (`--watch` waits 3 s more for straggling logs)."""
        store = WORK / "stores" / f"{self.name}-{label}"
        shutil.rmtree(store, ignore_errors=True)
        cpu_before = self.cpu_seconds() + children_cpu_seconds()
        start = since or time.perf_counter()
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
        ended = self.flow_run_end("".join(output))
        return {"wall_s": ended - clock_offset - start if ended else watch_exit, "watch_exit_s": watch_exit,
                "first_item_s": first_item, "ok": process.returncode == 0,
                "cpu_s": self.cpu_seconds() + children_cpu_seconds() - cpu_before}

    def flow_run_end(self, output: str) -> float | None:
        """When the flow run that `prefect deployment run` printed (its UUID) ended, in epoch seconds."""
        found = re.search(r"UUID: ([0-9a-f-]{36})", output)
        if not found:
            return None
        with urllib.request.urlopen(f"{self.local.api_url}/flow_runs/{found.group(1)}", timeout=10) as response:
            end_time = json.loads(response.read())["end_time"]
        return datetime.datetime.fromisoformat(end_time).timestamp() if end_time else None

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


WARM_CASE = Case("sdxl", "tiny", 8, 128, 128)


def warm_workers(prompts: int = 12, seeds: int = 2) -> dict:
    """Section 8: one batch (tiny SDXL, 12 prompts × 2 seeds, 8 steps, 128²) on the warm stage workers
    against the in-process CLI; first item after the workers start; one vs two accelerator workers;
    a worker's memory when batches alternate between two models."""
    model = model_folder("sdxl", "tiny")
    batch = {"model": model, "prompts": [f"{PROMPTS[i % len(PROMPTS)]}, study {i}" for i in range(prompts)],
             "seeds": list(range(seeds)), **{k: v for k, v in WARM_CASE.arguments().items() if v is not None},
             "dispatch": "warm"}
    items = prompts * seeds
    with Stack("warm", accelerator_workers=0) as stack:
        local = stack.local
        local.kill("stage-encode")
        started = time.perf_counter()
        workers = [local.start_stage_worker("stage-encode", "encode"),
                   local.start_stage_worker("stage-accelerator-0", "denoise,decode")]
        cold = stack.run_batch(batch, "cold", since=started)
        local.wait_until_connected(*workers)
        # Back to back (the idle workers use no CPU), so both see the same machine.
        cli, cli_cpu = cli_generate(batch, WORK / "stores" / "warm-cli")
        one = stack.run_batch(batch, "one-worker")
        local.wait_until_connected(local.start_stage_worker("stage-accelerator-1", "denoise,decode"))
        stack.run_batch({**batch, "prompts": batch["prompts"][:2], "seeds": [99]}, "warm-up-second")
        two = stack.run_batch(batch, "two-workers")
        local.kill("stage-accelerator-1")
        memory = alternating_models(stack)
    return {
        "items": items, "cli_in_process_s": cli, "cli_in_process_cpu_s": cli_cpu,
        "workers_start_to_first_item_s": cold["first_item_s"], "workers_start_to_batch_done_s": cold["wall_s"],
        "warm_pooled_s": one["wall_s"], "warm_pooled_first_item_s": one["first_item_s"],
        "warm_pooled_vs_cli": one["wall_s"] / cli, "warm_pooled_watch_exit_s": one["watch_exit_s"],
        # CPU seconds (every process of the stack) do not swell with other work on the machine.
        "warm_pooled_cpu_s": one["cpu_s"], "warm_pooled_vs_cli_cpu": one["cpu_s"] / cli_cpu,
        "orchestration_overhead_s_per_item": (one["wall_s"] - cli) / items,
        "orchestration_overhead_cpu_s_per_item": (one["cpu_s"] - cli_cpu) / items,
        "one_worker_items_per_s": items / one["wall_s"], "two_workers_items_per_s": items / two["wall_s"],
        "runs_ok": cold["ok"] and one["ok"] and two["ok"] and memory.pop("ok"),
        **memory,
    }


def cli_generate(batch: dict, store: Path, fresh: bool = True, options: tuple[str, ...] = ()) -> tuple[float, float]:
    """Wall and CPU seconds of `stagediff generate` for the batch, in-process, as a user runs it (in an
    emptied store unless not `fresh`), with more command-line `options`."""
    if fresh:
        shutil.rmtree(store, ignore_errors=True)
    command = [sys.executable, "-m", "stagediff.cli", "generate", "--model", batch["model"], "--store", str(store),
               "--steps", str(batch["steps"]), "--height", str(batch["height"]), "--width", str(batch["width"]),
               *options]
    for prompt in batch["prompts"]:
        command += ["--prompt", prompt]
    for seed in batch["seeds"]:
        command += ["--seed", str(seed)]
    start, cpu_before = time.perf_counter(), children_cpu_seconds()
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start, children_cpu_seconds() - cpu_before


CLI_CASE = Case("sdxl", "small", 10, 256, 256)


def cli_end_to_end(prompts: int = 3, seeds: int = 4, case: Case = CLI_CASE) -> dict:
    """Section 11: `stagediff generate` as a user runs it (a new process: imports, model loads, the three
    stages) against the plain diffusers loop on the same items, and a no-op rerun of a finished batch of
    24 items (tiny SDXL, 6 prompts × 4 seeds). Once more with each prompt's seeds denoised and decoded in
    one call (`--batch-size`)."""
    batch = {"model": model_folder(case.model, case.scale), "prompts": PROMPTS[:prompts],
             "seeds": list(range(seeds)), **case.arguments()}
    plain_out = WORK / "plain" / "cli"
    shutil.rmtree(plain_out, ignore_errors=True)
    # Both timed as whole processes, imports included.
    start = time.perf_counter()
    run_workload("plain_loop", {**batch, "dtype": "float32", "out": str(plain_out)})
    plain_seconds = time.perf_counter() - start
    store = WORK / "stores" / "cli"
    generate_seconds, _ = cli_generate(batch, store)
    from stagediff.manifest import artifact_path

    (manifest,) = store.glob("runs/*/manifest.json")
    ours = [store / artifact_path(item["media"]) for item in json.loads(manifest.read_text())["items"]]
    theirs = [plain_out / f"{p}-{seed}.png" for p in range(prompts) for seed in range(seeds)]
    batched_seconds, _ = cli_generate(batch, WORK / "stores" / "cli-batched", options=("--batch-size", str(seeds)))

    small = {"model": model_folder("sdxl", "tiny"), "prompts": [f"{PROMPTS[i % 4]}, study {i}" for i in range(6)],
             "seeds": list(range(4)), "steps": 2, "height": 64, "width": 64}
    cli_generate(small, WORK / "stores" / "cli-noop")
    noop_seconds, _ = cli_generate(small, WORK / "stores" / "cli-noop", fresh=False)
    return {"model": case.label(), "items": prompts * seeds, "steps": case.steps, "size": case.size,
            "plain_loop_s": plain_seconds, "stagediff_generate_s": generate_seconds,
            "ratio": plain_seconds / generate_seconds,
            "stagediff_generate_batched_s": batched_seconds, "batched_ratio": plain_seconds / batched_seconds,
            "max_pixel_diff": max(pixel_diff(str(a), str(b)) for a, b in zip(ours, theirs)),
            "noop_items": len(small["prompts"]) * len(small["seeds"]), "noop_generate_s": noop_seconds}


def alternating_models(stack: Stack) -> dict:
    """Batches on model A, B (another copy of A's files), A again on the one accelerator worker:
    its resident memory after each, against the size of the model's UNet."""
    import psutil

    model_a = Path(model_folder("sdxl", "small"))
    model_b = WORK / "models" / "sdxl-small-copy"
    if not model_b.exists():
        shutil.copytree(model_a, model_b, copy_function=os.link)
    worker = psutil.Process(stack.local.processes["stage-accelerator-0"].pid)
    before = worker.memory_info().rss
    batch = {"prompts": PROMPTS[:1], "seeds": [0], "steps": 1, "height": 64, "width": 64, "dispatch": "warm"}
    resident, ok = [], True
    for index, model in enumerate((model_a, model_b, model_a)):
        ok &= stack.run_batch({**batch, "model": str(model)}, f"memory-{index}")["ok"]
        resident.append(worker.memory_info().rss)
    megabytes = 2**20
    return {"unet_mb": sum(f.stat().st_size for f in model_a.glob("unet/*.safetensors")) / megabytes,
            "worker_rss_before_mb": before / megabytes, "worker_rss_after_a_mb": resident[0] / megabytes,
            "worker_rss_after_b_mb": resident[1] / megabytes, "worker_rss_after_a_again_mb": resident[2] / megabytes,
            "ok": ok}


def gpu(families: list[str]) -> dict:
    """Section 6: real-size architectures in bf16 on the GPU, stagediff against the diffusers pipeline."""
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device on this machine"}
    return {"device": torch.cuda.get_device_name(), "rows": [gpu_row(family, GPU[family]) for family in families]}


def gpu_row(family: str, case: Case, seeds: int = 2, dtype: str = "bfloat16") -> dict:
    """One prompt × `seeds` seeds both ways; the last item (warm) gives seconds per step and per image.
    stagediff's item is its accelerator time (denoise + decode); its encode runs once per prompt on the
    CPU (the encode workers' side), reported apart, while diffusers encodes on the GPU in every call."""
    plain, staged, max_diff = side_by_side(f"gpu-{family}", case, 1, seeds, dtype)
    stages = staged["stages"]
    ours_per_item = sum(stages[name]["item_seconds"][-1] for name in ("denoise", "decode"))
    return {
        "family": family, "model": case.label(dtype), "steps": case.steps, "size": case.size,
        "diffusers_s_per_step": plain["step_seconds"][-1],
        "stagediff_s_per_step": stages["denoise"]["item_seconds"][-1] / case.steps,
        "diffusers_s_per_item": plain["item_seconds"][-1], "stagediff_s_per_item": ours_per_item,
        "stagediff_cpu_encode_s_per_prompt": stages["encode"]["item_seconds"][0],
        "ratio": plain["item_seconds"][-1] / ours_per_item, "max_pixel_diff": max_diff, "anchor": case.anchor,
    }


def markdown(report: dict) -> str:
    """The report as markdown, one section per measurement the run made."""
    lines = [f"# stagediff benchmarks — {report['date']} on {report['machine']}", ""]
    if "sweep" in report:
        lines += sweep_markdown(report["sweep"])
    for key, title in (("memory", "3. Peak memory (RSS, MB) per stage process vs the full pipeline"),
                       ("real_memory", "3b. Peak memory (RSS, MB) at real size: the published architectures, "
                                       "random weights in bf16, one step")):
        if key in report:
            lines += ["", f"## {title}", "", "| family | model | size | encode | denoise | decode | full pipeline |",
                      "|---|---|---|---|---|---|---|"]
            lines += [f"| {row['family']} | {row['model']} | {row['size']} | {row['encode']} | {row['denoise']} | "
                      f"{row['decode']} | {row['full_pipeline']} |" for row in report[key]]
    for key, title, unit in (("compile", "4. Compile (torchax, tiny SDXL)", "value"),
                             ("orchestration", "5. Orchestration overhead (tiny SDXL, 8 items)", "seconds"),
                             ("cli", "11. `stagediff generate` end to end against the plain diffusers loop",
                              "value"),
                             ("warm", "8. Warm stage workers (tiny SDXL, 12 prompts × 2 seeds, 8 steps, 128²)",
                              "value")):
        if key in report:
            lines += ["", f"## {title}", "", f"| measure | {unit} |", "|---|---|"]
            lines += [f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |"
                      for k, v in report[key].items()]
    if "gpu" in report:
        lines += ["", "## 6. GPU: real-size architectures, random weights", ""] + gpu_markdown(report["gpu"])
    if "decode" in report:
        lines += ["", "## 9. Decode: torchax against torch, the Wan VAE's programs, tiled memory", ""]
        lines += decode_markdown(report["decode"])
    if "cpu_scaling" in report:
        lines += ["", "## 7. CPU fan-out: one process on all cores vs one single-thread process per core", ""]
        lines += cpu_scaling_markdown(report["cpu_scaling"])
    if "step_cache" in report:
        lines += ["", "## 10. Step caching (`--cache`): denoise speed-up and pixels against the exact run", ""]
        lines += step_cache_markdown(report["step_cache"])
    lines.append("")
    return "\n".join(lines)


def sweep_markdown(rows: list[dict]) -> list[str]:
    lines = ["## 1–2. Sweep throughput and where the time goes", "",
             "Reuse ceiling: the ratio if the encode calls stagediff skips were its only saving.", "",
             "| family | model | images | steps | size | plain loop img/s | stagediff img/s | ratio | reuse ceiling "
             "| max pixel diff | encode calls (stagediff / loop) | stage seconds (encode / denoise / decode) "
             "| model load s | store+other s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        stages = row["stage_seconds"]
        lines.append(
            f"| {row['family']} | {row['model']} | {row['images']} | {row['steps']} | {row['size']} | "
            f"{row['plain_images_per_s']:.3f} | {row['stagediff_images_per_s']:.3f} | {row['ratio']:.2f}× | "
            f"{row['reuse_ceiling']:.2f}× | {row['max_pixel_diff']} | {row['encode_calls']['stagediff']} / {row['encode_calls']['plain_loop']} | "
            f"{stages['encode']} / {stages['denoise']} / {stages['decode']} | {row['model_load_seconds']} | "
            f"{row['store_and_other_seconds']} |")
    return lines


def gpu_markdown(section: dict) -> list[str]:
    if "rows" not in section:
        return [f"Skipped: {section.get('skipped', 'not run')}."]
    lines = [f"On {section['device']}; the last of each run's items (warm). stagediff's item is its GPU time "
             "(denoise + decode); it encodes once per prompt on the CPU, apart.", "",
             "| family | model | steps | size | diffusers s/step | stagediff s/step | diffusers s/item | stagediff s/item "
             "| ratio | stagediff CPU encode s/prompt | max pixel diff | anchor |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in section["rows"]:
        lines.append(f"| {row['family']} | {row['model']} | {row['steps']} | {row['size']} | "
                     f"{row['diffusers_s_per_step']:.3f} | {row['stagediff_s_per_step']:.3f} | "
                     f"{row['diffusers_s_per_item']:.2f} | {row['stagediff_s_per_item']:.2f} | {row['ratio']:.2f}× | "
                     f"{row['stagediff_cpu_encode_s_per_prompt']:.2f} | {row['max_pixel_diff']} | {row['anchor']} |")
    return lines


def decode_markdown(section: dict) -> list[str]:
    lines = ["Decode stage per item on this CPU (the small models' VAEs), after the first item; compile: the "
             "first process (empty cache) and a second one (the first's cache).", "",
             "| family | model | size | torch s/item | torchax s/item | programs | compile cold s | compile cached s "
             "| cache hits | max pixel diff |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['family']} | {r['model']} | {r['size']} | {r['torch_s_per_item']:.3f} | "
              f"{r['torchax_s_per_item']:.3f} | {r['programs']} | {r['cold_compile_s']:.1f} | {r['cached_compile_s']:.1f} | "
              f"{r['cache_hits']} | {r['max_pixel_diff']} |" for r in section["backends"]]
    lines += ["", "The real Wan 2.1 VAE (random weights) at 32×32: torch, the per-frame compiled decoder "
              "stagediff uses, and the whole decode compiled as one program.", "",
              "| latent frames | video frames | decode | programs | compile s | first decode s | warm decode s |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['latent_frames']} | {r['frames']} | {r['mode']} | {r['programs']} | {r['compile_seconds']:.1f} | "
              f"{r['first_seconds']:.1f} | {r['warm_seconds']:.1f} |" for r in section["wan_programs"]]
    lines += ["", f"The real SDXL VAE (random weights) decoding one {TILED_MEMORY[0]}² image in torch: peak "
              "memory of the process, and stagediff's estimate of the one-piece decode's activations.", "",
              "| tiles | seconds | peak RSS MB | RSS before decode MB | estimated activations MB |", "|---|---|---|---|---|"]
    lines += [f"| {r['tile'] or 'none'} | {r['seconds']:.1f} | {r['max_rss_mb']:.0f} | {r['rss_before_decode_mb']:.0f} | "
              f"{r['estimate_mb']:.0f} |" for r in section["tiled_memory"]]
    return lines


def cpu_scaling_markdown(rows: list[dict]) -> list[str]:
    lines = ["Denoise compute of the same items at the same time, model loads left out.", "",
             "| family | model | items | size | one process s/item | process per core s/item | fan-out ratio "
             "| max pixel diff |", "|---|---|---|---|---|---|---|---|"]
    return lines + [f"| {row['family']} | {row['model']} | {row['items']} | {row['size']} | "
                    f"{row['one_process_s_per_item']:.2f} | {row['per_core_processes_s_per_item']:.2f} | "
                    f"{row['fan_out_ratio']:.2f}× | {row['max_pixel_diff']} |" for row in rows]


def step_cache_markdown(rows: list[dict]) -> list[str]:
    lines = ["Torch backend, float32, one thread, one item per setting, in one process after a warm-up. Speed-up: "
             "the exact denoise's CPU time over the cached one's (on one thread, CPU time is the work done, whatever "
             "else shares the machine). Block work: the multiply-accumulates of the Linear layers inside the "
             "transformer blocks that ran, as a share of the exact run's. PSNR and mean absolute error in 8-bit "
             "levels against the exact image (Wan: every frame of the MP4).", "",
             "| family | model | steps | size | --cache | exact denoise CPU s | cached denoise CPU s | speed-up "
             "| block work | PSNR dB | mean abs error |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    return lines + [f"| {row['family']} | {row['model']} | {row['steps']} | {row['size']} | `{row['cache']}` | "
                    f"{row['exact_cpu_s']:.1f} | {row['cpu_s']:.1f} | {row['speedup']:.2f}× | "
                    f"{row['block_work']:.0%} | {row['psnr_db']:.1f} | {row['mean_abs_error']:.2f} |" for row in rows]


# Sections run alone by their flag: flag → (report key, measurement, help).
ONLY_SECTIONS = {
    "--real-memory": ("real_memory",
                      lambda: [memory(family, case, "bfloat16") for family, case in REAL_MEMORY.items()],
                      "only section 3b (real-size SDXL and Wan in bf16: 21 GB of disk, 13 GB of RAM, "
                      "about 6 minutes on 2 cores)"),
    "--cpu-scaling": ("cpu_scaling", lambda: [cpu_scaling(family, case) for family, case in FULL.items()],
                      "only section 7 (the small models, one process on all cores against one "
                      "single-thread process per core; about 2 minutes on 2 cores)"),
    "--warm": ("warm", warm_workers,
               "only section 8 (a batch on the warm stage workers against the in-process CLI, "
               "one vs two accelerator workers, memory with alternating models)"),
    "--decode": ("decode", decode_section,
                 "only section 9 (decode: torchax against torch per family, the real Wan VAE's "
                 "programs, the real SDXL VAE tiled and not; about 25 minutes on 2 cores)"),
    "--cli": ("cli", cli_end_to_end,
              "only section 11 (`stagediff generate` end to end against the plain diffusers loop, small SDXL "
              "3 prompts × 4 seeds, 10 steps, 256²; a no-op rerun of 24 items; about 5 minutes)"),
    "--step-cache": ("step_cache",
                     lambda: [row for family, case in STEP_CACHE.items()
                              for row in step_cache(family, case, STEP_CACHE_SETTINGS[family])],
                     "only section 10 (the small models of flux1, flux2-klein and wan, each step-cache "
                     "method at two settings against the exact run, on one thread; about 10 minutes)"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 prompts × 2 seeds, no pooled path")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--gpu-only", action="store_true", help="only section 6 (real-size models on the GPU)")
    parser.add_argument("--gpu-families", default=",".join(GPU), help="families for section 6, comma-separated")
    for flag, (_, _, help_text) in ONLY_SECTIONS.items():
        parser.add_argument(flag, action="store_true", help=help_text)
    args = parser.parse_args()
    gpu_families = args.gpu_families.split(",")
    unknown = [family for family in gpu_families if family not in GPU]
    if unknown:
        parser.error(f"--gpu-families {unknown[0]!r} is not one of {', '.join(GPU)}")
    families = QUICK if args.quick else FULL
    prompts, seeds = (2, 2) if args.quick else (args.prompts, args.seeds)
    import torch

    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{socket.gethostname()}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "quick": args.quick,
    }
    only = next((flag for flag in ONLY_SECTIONS if getattr(args, flag[2:].replace("-", "_"))), None)
    if only:
        key, measure, _ = ONLY_SECTIONS[only]
        report[key] = measure()
    elif not args.gpu_only:
        report["sweep"] = [sweep(family, case, prompts, seeds) for family, case in families.items()]
        report["memory"] = [memory(family, case) for family, case in families.items()]
        report["compile"] = compile_reuse()
        report["orchestration"] = orchestration(pooled=not args.quick)
    if not only:
        report["gpu"] = {"skipped": "quick mode"} if args.quick else gpu(gpu_families)
    suffix = "-quick" if args.quick else "-gpu" if args.gpu_only else f"-{only[2:]}" if only else ""
    save_report(report, suffix, markdown(report))


def save_report(report: dict, suffix: str, table: str) -> None:
    """Write results/<date>-<host><suffix>.json and .md, and print the table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{report['date']}-{socket.gethostname()}{suffix}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"\nwritten: {stem}.json, {stem}.md")


if __name__ == "__main__":
    main()
