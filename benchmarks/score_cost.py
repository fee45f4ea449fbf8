"""What the score stage costs per item against the decode stage, on this machine's CPU: the small SDXL
(decode: its VAE) and CLIP scorers of two sizes (`small`: a ViT-B/32-sized image tower at 224²; `full`:
the architecture of openai/clip-vit-large-patch14, random weights). Both stages run with torch on the CPU,
batch 8, models already loaded (a warm worker); load times are reported apart.

    python benchmarks/score_cost.py [--items 8] [--size 256] [--clip small,full]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
os.environ.setdefault("STAGEDIFF_COMPILE_CACHE", tempfile.mkdtemp(prefix="stagediff-score-bench-"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--clip", default="small,full")
    args = parser.parse_args()

    from stagediff import stages
    from stagediff.plan import make_plan
    from stagediff.request import Request
    from stagediff.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="stagediff-score-bench-"))
    model = build_tiny_model("sdxl", work / "sdxl-small", "small")
    clips = {scale: build_tiny_model("clip", work / f"clip-{scale}", scale) for scale in args.clip.split(",")}
    base = dict(model=str(model), prompts=("a lighthouse on a cliff at dawn",), seeds=tuple(range(args.items)),
                steps=1, height=args.size, width=args.size, store=str(work / "store"), backend="torch", batch_size=8)
    plan = make_plan(Request(**base))
    for stage in ("encode", "denoise"):
        stages.run_stage(stage, plan)
    stages.run_stage("decode", plan)  # load (and warm up) the VAE
    for item in plan.items:
        plan.store.remove(item.media_path)
    decode = stages.run_stage("decode", plan)
    print(f"decode  small SDXL VAE {args.size}²: {statistics.mean(decode.item_seconds):.3f} s/item "
          f"(batches {decode.batch_sizes})")
    for scale, folder in clips.items():
        scored = make_plan(Request(**base, scores=(f"clip:{folder}",)))
        first = stages.run_stage("score", scored)
        for task in stages.STAGES["score"].artifacts(scored):
            scored.store.remove(task.path)
        start = time.perf_counter()
        warm = stages.run_stage("score", scored)
        wall = time.perf_counter() - start
        print(f"score   CLIP {scale:5s}: {statistics.mean(warm.item_seconds):.3f} s/item "
              f"({wall / args.items:.3f} s/item with reading and writing; load {first.load_seconds:.2f} s) = "
              f"{statistics.mean(warm.item_seconds) / statistics.mean(decode.item_seconds):.2f}× decode")


if __name__ == "__main__":
    main()
