"""What a LoRA costs: loading and fusing it into the denoise stage's UNet, and the compiled denoise step with
the LoRA fused against the base model's (torchax, the small SDXL on the CPU). The fused UNet has the base
model's modules, so its compiled program is the base model's: a run with the LoRA finds it in the
persistent compile cache the base run filled.

    python benchmarks/lora.py [--rank 16] [--steps 4] [--items 3]

Writes benchmarks/results/<date>-<host>-lora.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("STAGEDIFF_COMPILE_CACHE", tempfile.mkdtemp(prefix="stagediff-lora-bench-"))

from common import WORK, model_folder, save_report  # noqa: E402

SIZE = 128
LOADS = 3
ROUNDS = 3


def build_lora(model: Path, rank: int) -> Path:
    """A LoRA of `rank` on every attention projection of the UNet and of CLIP-L (diffusers' format)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from lora_files import ATTENTION, CLIP_ATTENTION, trained_lora

    folder = WORK / "loras" / f"{model.name}-rank{rank}"
    if not (folder / "lora.safetensors").exists():
        unet, unet_metadata = trained_lora(UNet2DConditionModel.from_pretrained(model / "unet"), ATTENTION, 1, rank, rank)
        clip, clip_metadata = trained_lora(CLIPTextModel.from_pretrained(model / "text_encoder"), CLIP_ATTENTION, 2,
                                           rank, rank)
        StableDiffusionXLPipeline.save_lora_weights(
            folder, weight_name="lora.safetensors", unet_lora_layers=unet, unet_lora_adapter_metadata=unet_metadata,
            text_encoder_lora_layers=clip, text_encoder_lora_adapter_metadata=clip_metadata)
    return folder / "lora.safetensors"


def load_seconds(plan, loras) -> float:
    """Median time to load the denoise stage's pipeline (torch, no compilation) with `loras` fused."""
    from stagediff import stages

    times = []
    for _ in range(LOADS):
        stages.release()
        start = time.perf_counter()
        stages.stage_pipeline(plan, stages.DENOISE, loras)
        times.append(time.perf_counter() - start)
    stages.release()
    return statistics.median(times)


def compiled_steps(request, steps: int) -> dict:
    """Denoise on torchax in a fresh store: compile time, programs from the persistent cache, and the
    seconds per step of each item after the first."""
    from stagediff import stages
    from stagediff.plan import make_plan

    shutil.rmtree(request.store, ignore_errors=True)
    plan = make_plan(request)
    stages.encode(plan)
    result = stages.denoise(plan)
    stages.release()
    return {"compile_s": result.compile_seconds, "from_cache": result.compile_cache_hits,
            "step_s": [seconds / steps for seconds in result.item_seconds[1:]]}


def alternating(requests: dict, steps: int) -> dict:
    """`compiled_steps` of each request, in turns for ROUNDS rounds (a shared machine's load drifts; turns
    spread it over both): the first round's compile, and the median step over all rounds."""
    rounds = [{name: compiled_steps(request, steps) for name, request in requests.items()} for _ in range(ROUNDS)]
    return {name: {"compile_s": rounds[0][name]["compile_s"], "from_cache": rounds[0][name]["from_cache"],
                   "step_s": statistics.median(s for run in rounds for s in run[name]["step_s"])}
            for name in requests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--items", type=int, default=3, help="seeds per run (the first one compiles)")
    args = parser.parse_args()

    import torch
    from safetensors import safe_open

    from stagediff.plan import make_plan
    from stagediff.request import Request

    model = Path(model_folder("sdxl", "small"))
    lora = build_lora(model, args.rank)
    with safe_open(lora, framework="pt") as weights:
        lora_parameters = sum(weights.get_slice(name).get_shape()[0] * weights.get_slice(name).get_shape()[1]
                              for name in weights.keys())
    stores = WORK / "stores" / "lora"
    shutil.rmtree(stores, ignore_errors=True)
    base = Request(model=str(model), prompts=["a lighthouse on a cliff at dawn"], seeds=list(range(args.items)),
                   steps=args.steps, height=SIZE, width=SIZE, store=str(stores / "base"), backend="torch")
    with_lora = base.replace(loras=[f"{lora}:0.8"], store=str(stores / "lora"))
    lora_plan = make_plan(with_lora)
    base_load = load_seconds(make_plan(base), ())
    lora_load = load_seconds(lora_plan, lora_plan.points[0].loras)
    measured = alternating({"base": base.replace(backend="torchax"), "lora": with_lora.replace(backend="torchax")},
                           args.steps)
    base_steps, lora_steps = measured["base"], measured["lora"]

    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{socket.gethostname()}: {os.cpu_count()} cores, torch {torch.__version__}",
        "model": "sdxl (small)", "lora_rank": args.rank, "lora_parameters": lora_parameters,
        "lora_file_mb": lora.stat().st_size / 2**20, "size": f"{SIZE}×{SIZE}", "steps": args.steps,
        "denoise_load_s": {"base": base_load, "lora": lora_load, "lora_load_and_fuse": lora_load - base_load},
        "torchax": {"base": base_steps, "lora": lora_steps,
                    "step_ratio": lora_steps["step_s"] / base_steps["step_s"]},
    }
    save_report(report, "-lora", markdown(report))


def markdown(report: dict) -> str:
    load, steps = report["denoise_load_s"], report["torchax"]
    return "\n".join([
        f"# LoRA cost: {report['model']}, rank {report['lora_rank']} ({report['lora_parameters'] / 1e6:.2f}M "
        f"parameters, {report['lora_file_mb']:.1f} MB), {report['size']}, {report['steps']} steps",
        "", report["machine"], "",
        "| | base | with the LoRA fused |",
        "|---|---|---|",
        f"| denoise stage load (torch, median of {LOADS}) | {load['base']:.2f} s | {load['lora']:.2f} s "
        f"(LoRA load + fuse {load['lora_load_and_fuse']:.2f} s) |",
        f"| torchax compile (programs from the persistent cache) | {steps['base']['compile_s']:.2f} s "
        f"({steps['base']['from_cache']}) | {steps['lora']['compile_s']:.2f} s ({steps['lora']['from_cache']}) |",
        f"| torchax denoise step (median of {ROUNDS} alternating runs, after compile) | {steps['base']['step_s']:.3f} s | "
        f"{steps['lora']['step_s']:.3f} s ({steps['step_ratio']:.2f}×) |",
        "",
    ])


if __name__ == "__main__":
    main()
