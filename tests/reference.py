"""Reference outputs from diffusers' own pipelines, the correctness oracle for every family."""

from __future__ import annotations

import functools

import numpy as np
import torch


@functools.lru_cache(maxsize=8)
def reference_pipeline(pipeline_class, folder: str):
    """The full diffusers pipeline of a tiny model, loaded once per test session."""
    pipe = pipeline_class.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_outputs(pipeline_class, folder, seed: int, **call_kwargs) -> tuple[torch.Tensor, np.ndarray]:
    """(latents as output_type="latent" returns them, uint8 pixels `[..., H, W, 3]`) for one seed."""
    pipe = reference_pipeline(pipeline_class, str(folder))
    latents = pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", **call_kwargs)
    images = pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **call_kwargs)
    latents = getattr(latents, "images", None) if hasattr(latents, "images") else latents.frames
    pixels = images.images if hasattr(images, "images") else images.frames
    return latents, (np.asarray(pixels) * 255).round().astype(np.uint8)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    return float((actual.float() - expected.float()).abs().max() / expected.float().abs().max())
