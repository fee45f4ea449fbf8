"""`make bench`: stagediff against a plain diffusers loop, where the time goes, stage memory, compile
reuse, orchestration overhead. Writes benchmarks/results/<date>-<host>.json and .md and prints the table.

    python benchmarks/run.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "work"
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

PROMPTS = ["a lighthouse on a cliff at dawn", "a red fox in fresh snow", "a bowl of ramen, studio light",
           "an astronaut riding a horse"]
# family -> (tiny-model name, scale, steps, size, frames): compute-dominated settings per family.
FULL = {
    "sdxl": ("sdxl", "small", 6, 256, None),
    "flux1": ("flux1", "small", 4, 256, None),
    "flux2": ("flux2", "small", 4, 256, None),
    "flux2-klein": ("flux2-klein", "small", 4, 256, None),
    "wan": ("wan", "small", 6, 64, 17),
}
QUICK = {"sdxl": ("sdxl", "tiny", 2, 64, None)}


def run_workload(name: str, args: dict, env: dict | None = None) -> dict:
    process = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "workloads.py"), name, json.dumps(args)],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=ROOT,
    )
    if process.returncode != 0:
        raise RuntimeError(f"workload {name} failed:\n{process.stderr[-3000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def model_folder(tiny_name: str, scale: str) -> str:
    from stagediff.tiny import build_tiny_model

    folder = WORK / "models" / f"{tiny_name}-{scale}"
    if not (folder / "model_index.json").exists():
        build_tiny_model(tiny_name, folder, scale)
    return str(folder)


def read_frames(path: str) -> np.ndarray:
    import imageio.v3 as iio

    data = Path(path).read_bytes()
    return iio.imread(data, extension=Path(path).suffix)


def sweep(family: str, spec: tuple, prompts: int, seeds: int) -> dict:
    tiny_name, scale, steps, size, frames = spec
    model = model_folder(tiny_name, scale)
    base = {"model": model, "prompts": PROMPTS[:prompts], "seeds": list(range(seeds)), "steps": steps, "size": size,
            "frames": frames}
    store = WORK / "stores" / family
    plain_out = WORK / "plain" / family
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(plain_out, ignore_errors=True)
    plain = run_workload("plain_loop", {**base, "out": str(plain_out)})
    staged = run_workload("staged", {**base, "store": str(store), "batch_size": 1})
    images = prompts * seeds
    diffs = []
    index = 0
    for p_index in range(prompts):
        for seed in range(seeds):
            extension = "mp4" if frames else "png"
            ours = read_frames(staged["media"][index]).astype(int)
            theirs = read_frames(str(plain_out / f"{p_index}-{seed}.{extension}")).astype(int)
            diffs.append(int(np.abs(ours - theirs).max()))
            index += 1
    stage_seconds = {name: round(s["seconds"], 2) for name, s in staged["stages"].items()}
    compute = sum(s["compute_seconds"] for s in staged["stages"].values())
    loads = sum(s["load_seconds"] for s in staged["stages"].values())
    return {
        "family": family, "model": f"{tiny_name} ({scale})", "images": images, "steps": steps, "size": size,
        "frames": frames, "plain_images_per_s": images / plain["seconds"],
        "stagediff_images_per_s": images / staged["seconds"], "ratio": plain["seconds"] / staged["seconds"],
        "max_pixel_diff": max(diffs), "stage_seconds": stage_seconds, "model_load_seconds": round(loads, 2),
        "compute_seconds": round(compute, 2), "store_and_other_seconds": round(staged["seconds"] - compute - loads, 2),
        "encode_calls": {"stagediff": prompts, "plain_loop": images},
    }


def memory(family: str, spec: tuple) -> dict:
    tiny_name, scale, steps, size, frames = spec
    base = {"model": model_folder(tiny_name, scale), "prompts": PROMPTS[:1], "seeds": [0], "steps": steps,
            "size": size, "frames": frames, "store": str(WORK / "stores" / f"memory-{family}")}
    shutil.rmtree(base["store"], ignore_errors=True)
    peaks = {name: run_workload("stage", {**base, "stage": name})["max_rss_mb"] for name in ("encode", "denoise", "decode")}
    full = run_workload("full_pipeline", {**base, "out": str(WORK / "plain" / f"memory-{family}")})["max_rss_mb"]
    return {"family": family, **{k: round(v) for k, v in peaks.items()}, "full_pipeline": round(full)}


def compile_reuse() -> dict:
    base = {"model": model_folder("sdxl", "tiny"), "prompts": PROMPTS[:1], "seeds": [0], "steps": 2, "size": 64,
            "store": str(WORK / "stores" / "compile")}
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
    base = {"model": model_folder("sdxl", "tiny"), "prompts": PROMPTS[:2], "seeds": [0, 1, 2, 3], "steps": 2,
            "size": 64}
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
                      "height": base["size"], "width": base["size"], "store": str(store)}
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


def gpu() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device on this machine"}
    return {"skipped": "real-size GPU runs are not implemented yet (no GPU was available to validate them)"}


def markdown(report: dict) -> str:
    lines = [f"# stagediff benchmarks — {report['date']} on {report['machine']}", ""]
    lines += ["## 1–2. Sweep throughput and where the time goes", "",
              "| family | model | images | steps | size | plain loop img/s | stagediff img/s | ratio | max pixel diff | encode calls (stagediff / loop) | stage seconds (encode / denoise / decode) | model load s | store+other s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["sweep"]:
        stages = row["stage_seconds"]
        lines.append(
            f"| {row['family']} | {row['model']} | {row['images']} | {row['steps']} | {row['size']}"
            f"{'×' + str(row['frames']) + 'f' if row['frames'] else ''} | {row['plain_images_per_s']:.3f} | "
            f"{row['stagediff_images_per_s']:.3f} | {row['ratio']:.2f}× | {row['max_pixel_diff']} | "
            f"{row['encode_calls']['stagediff']} / {row['encode_calls']['plain_loop']} | "
            f"{stages['encode']} / {stages['denoise']} / {stages['decode']} | {row['model_load_seconds']} | "
            f"{row['store_and_other_seconds']} |")
    lines += ["", "## 3. Peak memory (RSS, MB) per stage process vs the full pipeline", "",
              "| family | encode | denoise | decode | full pipeline |", "|---|---|---|---|---|"]
    for row in report["memory"]:
        lines.append(f"| {row['family']} | {row['encode']} | {row['denoise']} | {row['decode']} | {row['full_pipeline']} |")
    lines += ["", "## 4. Compile (torchax, tiny SDXL)", "", "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in report["compile"].items()]
    lines += ["", "## 5. Orchestration overhead (tiny SDXL, 8 items)", "", "| measure | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in report["orchestration"].items()]
    lines += ["", "## 6. GPU", "", f"{report['gpu']}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 prompts × 2 seeds, no pooled path")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=8)
    args = parser.parse_args()
    families = QUICK if args.quick else FULL
    prompts, seeds = (2, 2) if args.quick else (args.prompts, args.seeds)
    import torch

    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{socket.gethostname()}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "quick": args.quick,
        "sweep": [sweep(family, spec, prompts, seeds) for family, spec in families.items()],
        "memory": [memory(family, spec) for family, spec in families.items()],
        "compile": compile_reuse(),
        "orchestration": orchestration(pooled=not args.quick),
        "gpu": gpu(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{report['date']}-{socket.gethostname()}{'-quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"\nwritten: {stem}.json, {stem}.md")


if __name__ == "__main__":
    main()
