"""Random-init models of each family's real architecture: `tiny` for tests and the demo, `small`
(denoisers of roughly 50-100M parameters, so that their compute dominates) for CPU benchmarks, `full`
(the real denoiser, VAE and text encoders) for GPU benchmarks and the real-size memory measurement."""

from __future__ import annotations

import importlib
from pathlib import Path

from stagediff.errors import StagediffError

SCALES = ("tiny", "small", "full")
FULL_SCALE = ("sdxl", "flux1", "flux1-schnell", "wan", "clip")
"""The families whose real sizes are built (those the GPU benchmark measures)."""

# name -> "module" (its `build`) or "module:function" for a variant built by another function.
BUILDERS = {
    "sdxl": "stagediff.tiny.sdxl",
    "flux1": "stagediff.tiny.flux1",
    "flux1-schnell": "stagediff.tiny.flux1:build_schnell",
    "flux2": "stagediff.tiny.flux2",
    "flux2-klein": "stagediff.tiny.flux2:build_klein",
    "flux2-klein-base": "stagediff.tiny.flux2:build_klein_base",
    "wan": "stagediff.tiny.wan",
    "clip": "stagediff.tiny.clip",
}


def build_tiny_model(family: str, folder: Path, scale: str = "tiny") -> Path:
    """Build the random-init checkpoint of `family` at `scale` into `folder` (diffusers layout with
    model_index.json)."""
    if family not in BUILDERS:
        raise StagediffError(f"unknown family {family!r} for tiny-model (choose from {', '.join(BUILDERS)})")
    if scale not in SCALES:
        raise StagediffError(f"unknown scale {scale!r} for tiny-model (choose from {', '.join(SCALES)})")
    if scale == "full" and family not in FULL_SCALE:
        raise StagediffError(f"scale 'full' is not built for {family!r} (only for {', '.join(FULL_SCALE)})")
    module_name, _, function = BUILDERS[family].partition(":")
    build = getattr(importlib.import_module(module_name), function or "build")
    return build(Path(folder), scale=scale)
