"""`make bench`: stagediff against a plain diffusers loop, where the time goes, stage memory, compile
reuse, orchestration overhead. Writes benchmarks/results/<date>-<host>.json and .md and prints the table.

    python benchmarks/run.py [--quick | --gpu-only [--gpu-families sdxl,flux1,wan] | --real-memory | --cpu-scaling]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
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
        results.update(pooled_path(base, items))
    return results


def pooled_path(base: dict, items: int) -> dict:
    from flows.local_stack import LocalStack

    store = WORK / "stores" / "orchestration-pooled"
    shutil.rmtree(store, ignore_errors=True)
    stack = LocalStack(WORK / "prefect", extra_env={"PREFECT_UI_ENABLED": "false"})
    try:
        start = time.perf_counter()
        stack.start_server()
        stack.create_pools()
        stack.deploy()
        ready = time.perf_counter()
        for pool in ("cpu-pool", "tpu-pool"):
            stack.start_worker(pool)
        parameters = {"model": base["model"], "prompts": base["prompts"], "seeds": base["seeds"], "steps": base["steps"],
                      "height": base["height"], "width": base["width"], "store": str(store)}
        submitted = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "prefect", "--no-prompt", "deployment", "run",
                                    "generate/stagediff", "--params", json.dumps(parameters), "--watch"],
                                   env=stack.env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        first_item = None
        while process.poll() is None:
            if first_item is None and list(store.glob("media/*.png")):
                first_item = time.perf_counter() - submitted
            time.sleep(0.2)
        total = time.perf_counter() - submitted
        return {"pooled_setup_s": ready - start, "pooled_s_per_item": total / items,
                "pooled_worker_start_to_first_item_s": first_item, "pooled_run_ok": process.returncode == 0}
    finally:
        stack.stop()


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
                             ("orchestration", "5. Orchestration overhead (tiny SDXL, 8 items)", "seconds")):
        if key in report:
            lines += ["", f"## {title}", "", f"| measure | {unit} |", "|---|---|"]
            lines += [f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |"
                      for k, v in report[key].items()]
    if "gpu" in report:
        lines += ["", "## 6. GPU: real-size architectures, random weights", ""] + gpu_markdown(report["gpu"])
    if "cpu_scaling" in report:
        lines += ["", "## 7. CPU fan-out: one process on all cores vs one single-thread process per core", ""]
        lines += cpu_scaling_markdown(report["cpu_scaling"])
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


def cpu_scaling_markdown(rows: list[dict]) -> list[str]:
    lines = ["Denoise compute of the same items at the same time, model loads left out.", "",
             "| family | model | items | size | one process s/item | process per core s/item | fan-out ratio "
             "| max pixel diff |", "|---|---|---|---|---|---|---|---|"]
    return lines + [f"| {row['family']} | {row['model']} | {row['items']} | {row['size']} | "
                    f"{row['one_process_s_per_item']:.2f} | {row['per_core_processes_s_per_item']:.2f} | "
                    f"{row['fan_out_ratio']:.2f}× | {row['max_pixel_diff']} |" for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 prompts × 2 seeds, no pooled path")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--gpu-only", action="store_true", help="only section 6 (real-size models on the GPU)")
    parser.add_argument("--gpu-families", default=",".join(GPU), help="families for section 6, comma-separated")
    parser.add_argument("--real-memory", action="store_true",
                        help="only section 3b (real-size SDXL and Wan in bf16: 21 GB of disk, 13 GB of RAM, "
                             "about 6 minutes on 2 cores)")
    parser.add_argument("--cpu-scaling", action="store_true",
                        help="only section 7 (the small models, one process on all cores against one "
                             "single-thread process per core; about 2 minutes on 2 cores)")
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
    if args.real_memory:
        report["real_memory"] = [memory(family, case, "bfloat16") for family, case in REAL_MEMORY.items()]
    elif args.cpu_scaling:
        report["cpu_scaling"] = [cpu_scaling(family, case) for family, case in FULL.items()]
    elif not args.gpu_only:
        report["sweep"] = [sweep(family, case, prompts, seeds) for family, case in families.items()]
        report["memory"] = [memory(family, case) for family, case in families.items()]
        report["compile"] = compile_reuse()
        report["orchestration"] = orchestration(pooled=not args.quick)
    if not (args.real_memory or args.cpu_scaling):
        report["gpu"] = {"skipped": "quick mode"} if args.quick else gpu(gpu_families)
    suffix = ("-quick" if args.quick else "-gpu" if args.gpu_only else "-real-memory" if args.real_memory
              else "-cpu-scaling" if args.cpu_scaling else "")
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
