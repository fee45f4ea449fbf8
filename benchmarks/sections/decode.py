"""Section 9 (`--decode`): the decode stage on torchax against torch, the Wan VAE's programs, tiled memory."""

from __future__ import annotations

import shutil

import numpy as np

from common import FULL, PROMPTS, Case, model_folder, pixel_diff, run_workload, work_path

WAN_LATENT_FRAMES = (5, 21)
"""17 and 81 video frames."""
TILED_MEMORY = (1024, 512)
"""The real SDXL VAE at 1024² (two minutes or more per decode on 2 cores), in one piece and in 512² tiles."""


def decode_section() -> dict:
    """Every family's decode on both backends, the real Wan VAE's programs, the real SDXL VAE tiled and not."""
    return {"backends": [decode_backends(family, case) for family, case in FULL.items()],
            # No persistent cache: each run compiles (the per-frame programs do not depend on the frame count).
            "wan_programs": [run_workload("wan_vae_programs", {"mode": mode, "latent_frames": frames, "size": 32},
                                          {"STAGEDIFF_COMPILE_CACHE": "off"}) | {"mode": mode, "latent_frames": frames}
                             for frames in WAN_LATENT_FRAMES for mode in ("torch", "frame", "whole")],
            "tiled_memory": [run_workload("vae_memory", {"size": TILED_MEMORY[0], "tile": tile}) | {"tile": tile}
                             for tile in (None, TILED_MEMORY[1])]}


def decode_backends(family: str, case: Case, items: int = 3) -> dict:
    """The same stored latents decoded by the torch backend and by torchax, the latter in a process with
    an empty compile cache (cold) and in one with the first's cache."""
    base = {"model": model_folder(case.model, case.scale), "prompts": PROMPTS[:1], "seeds": list(range(items)),
            **case.arguments(), "steps": 1}
    stores = work_path("stores", f"decode-{family}")
    cache = work_path("decode-cache", family)
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


def markdown(section: dict) -> list[str]:
    lines = ["## 9. Decode: torchax against torch, the Wan VAE's programs, tiled memory", "",
             "Decode stage per item on this CPU (the small models' VAEs), after the first item; compile: the "
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
