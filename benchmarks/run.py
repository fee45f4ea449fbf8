"""`make bench`: stagediff against a plain diffusers loop, where the time goes, stage memory, compile
reuse, orchestration overhead. Writes benchmarks/results/<date>-<host>.json and .md and prints the table.

    python benchmarks/run.py [--quick | --gpu-only [--gpu-families sdxl,flux1,wan] | --real-memory | --cpu-scaling
                              | --warm | --decode | --step-cache | --cli]

Each section's measurements and table live in benchmarks/sections/; what they share in benchmarks/common.py.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket

from common import FULL, QUICK, save_report
from sections import (cli_end_to_end, compile_reuse, cpu_scaling, decode, gpu, memory, orchestration, step_cache,
                      sweep, warm_workers)

# Sections run alone by their flag: flag → (report key, measurement, help).
ONLY_SECTIONS = {
    "--real-memory": ("real_memory", memory.real_memory_section,
                      "only section 3b (real-size SDXL and Wan in bf16: 21 GB of disk, 13 GB of RAM, "
                      "about 6 minutes on 2 cores)"),
    "--cpu-scaling": ("cpu_scaling", cpu_scaling.cpu_scaling_section,
                      "only section 7 (the small models, one process on all cores against one "
                      "single-thread process per core; about 2 minutes on 2 cores)"),
    "--warm": ("warm", warm_workers.warm_workers,
               "only section 8 (a batch on the warm stage workers against the in-process CLI, "
               "one vs two accelerator workers, memory with alternating models)"),
    "--decode": ("decode", decode.decode_section,
                 "only section 9 (decode: torchax against torch per family, the real Wan VAE's "
                 "programs, the real SDXL VAE tiled and not; about 25 minutes on 2 cores)"),
    "--cli": ("cli", cli_end_to_end.cli_end_to_end,
              "only section 11 (`stagediff generate` end to end against the plain diffusers loop, small SDXL "
              "3 prompts × 4 seeds, 10 steps, 256²; a no-op rerun of 24 items; about 5 minutes)"),
    "--step-cache": ("step_cache", step_cache.step_cache_section,
                     "only section 10 (the small models of flux1, flux2-klein and wan, each step-cache "
                     "method at two settings against the exact run, on one thread; about 10 minutes)"),
}

# The report's sections in the markdown's order: report key → its table.
MARKDOWN = {
    "sweep": sweep.markdown,
    "memory": memory.markdown,
    "real_memory": memory.real_memory_markdown,
    "compile": compile_reuse.markdown,
    "orchestration": orchestration.markdown,
    "cli": cli_end_to_end.markdown,
    "warm": warm_workers.markdown,
    "gpu": gpu.markdown,
    "decode": decode.markdown,
    "cpu_scaling": cpu_scaling.markdown,
    "step_cache": step_cache.markdown,
}


def markdown(report: dict) -> str:
    """The report as markdown, one section per measurement the run made."""
    lines = [f"# stagediff benchmarks — {report['date']} on {report['machine']}", ""]
    for key, section_markdown in MARKDOWN.items():
        if key in report:
            # As the reports have always been written: sections 1–2 right after the title's blank line,
            # every other section after a blank line of its own.
            lines += [*([] if key == "sweep" else [""]), *section_markdown(report[key])]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 prompts × 2 seeds, no pooled path")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--gpu-only", action="store_true", help="only section 6 (real-size models on the GPU)")
    parser.add_argument("--gpu-families", default=",".join(gpu.GPU), help="families for section 6, comma-separated")
    for flag, (_, _, help_text) in ONLY_SECTIONS.items():
        parser.add_argument(flag, action="store_true", help=help_text)
    args = parser.parse_args()
    gpu_families = args.gpu_families.split(",")
    unknown = [family for family in gpu_families if family not in gpu.GPU]
    if unknown:
        parser.error(f"--gpu-families {unknown[0]!r} is not one of {', '.join(gpu.GPU)}")
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
        report["sweep"] = [sweep.sweep(family, case, prompts, seeds) for family, case in families.items()]
        report["memory"] = [memory.memory(family, case) for family, case in families.items()]
        report["compile"] = compile_reuse.compile_reuse()
        report["orchestration"] = orchestration.orchestration(pooled=not args.quick)
    if not only:
        report["gpu"] = {"skipped": "quick mode"} if args.quick else gpu.gpu(gpu_families)
    suffix = "-quick" if args.quick else "-gpu" if args.gpu_only else f"-{only[2:]}" if only else ""
    save_report(report, suffix, markdown(report))


if __name__ == "__main__":
    main()
