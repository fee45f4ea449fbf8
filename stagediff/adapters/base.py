"""The numerics of a model family: how its diffusers pipeline encodes prompts, runs the denoise loop
and decodes latents. An adapter owns only what differs between families; loading, storing, keys,
batching and orchestration are shared and live elsewhere. Only the stages import adapters."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stagediff.families import Family, Settings

StepCallback = Callable[[int, int], None]
"""Called as `on_step(step_index, total_steps)` after each denoise step."""


class Adapter(ABC):
    """One family's encode / denoise / decode over its diffusers pipeline."""

    family: Family
    latents_field: str = "images"
    """The field of the pipeline's output that holds latents with `output_type="latent"`."""

    def own_components(self, folder: Path, names: tuple[str, ...]) -> dict[str, Any]:
        """Components among `names` that this family loads itself rather than through the diffusers
        pipeline's loader (which then skips them); none by default."""
        return {}

    def magcache_ratios(self) -> list[float] | None:
        """MagCache's magnitude ratios for this family as diffusers ships them (`Family.ships_magcache_ratios`)."""
        return None

    @abstractmethod
    def encode(self, pipe, prompt: str, negative_prompt: str | None, settings: Settings) -> dict[str, torch.Tensor]:
        """Encode one prompt and its negative prompt (None: the pipeline's own default) into named
        embedding tensors, batch size 1."""

    def guidance_arguments(self, settings: Settings) -> dict:
        """The pipeline call's guidance arguments for these settings (the CFG scale by default)."""
        return {"guidance_scale": settings.guidance}

    def denoise(
        self,
        pipe,
        embeddings: list[dict[str, torch.Tensor]],
        generators: list[torch.Generator],
        settings: Settings,
        on_step: StepCallback | None = None,
    ) -> torch.Tensor:
        """Run the denoise loop for a batch of items; return latents `[B, ...]` as the pipeline's
        `output_type="latent"` would, item i drawn with `generators[i]` from `embeddings[i]`. By
        default: the pipeline itself, called with the stacked embeddings in place of prompts."""
        return self.call_pipeline(pipe, batch_on_device(pipe, embeddings), generators, settings, on_step)

    def call_pipeline(self, pipe, batch: dict[str, torch.Tensor], generators, settings: Settings,
                      on_step: StepCallback | None = None, **arguments) -> torch.Tensor:
        """Call the pipeline on embedding tensors (already on its device) for latents; `arguments` are
        the family's further call arguments."""
        output = pipe(
            **batch,
            **self.guidance_arguments(settings),
            num_inference_steps=settings.steps,
            height=settings.height,
            width=settings.width,
            generator=generators,
            output_type="latent",
            callback_on_step_end=step_reporter(on_step, settings.steps),
            **arguments,
        )
        return getattr(output, self.latents_field)

    def vae_dtype(self, vae) -> torch.dtype:
        """The dtype the pipeline decodes in (the VAE's own by default)."""
        return vae.dtype

    @abstractmethod
    def decode(self, pipe, latents: torch.Tensor, settings: Settings) -> Iterator[np.ndarray]:
        """Decode latents of a batch of items `[B, ...]` to uint8 frames, yielded in chunks
        `[B, f, H, W, 3]` as they are decoded (one chunk of one frame for images)."""


def batch_on_device(pipe, embeddings: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-item embedding dicts concatenated along the batch dimension, on the pipeline's device."""
    device = pipe._execution_device
    return {name: torch.cat([item[name] for item in embeddings]).to(device) for name in embeddings[0]}


def step_reporter(on_step: StepCallback | None, total: int):
    """A diffusers `callback_on_step_end` that forwards step progress to `on_step`."""

    def callback(pipe, step_index, timestep, callback_kwargs):
        if on_step is not None:
            on_step(step_index, total)
        return callback_kwargs

    return callback


def to_uint8_frames(images: torch.Tensor) -> np.ndarray:
    """Map decoded images in [-1, 1], `[B, C, H, W]`, to uint8 `[B, H, W, C]` as diffusers' postprocess does."""
    images = (images / 2 + 0.5).clamp(0, 1)
    array = images.detach().cpu().permute(0, 2, 3, 1).float().numpy()
    return (array * 255).round().astype(np.uint8)


@torch.no_grad()
def decode_images(vae, latents: torch.Tensor) -> np.ndarray:
    """The VAE's decode of image latents as one chunk of uint8 frames `[B, 1, H, W, 3]`."""
    return to_uint8_frames(vae.decode(latents, return_dict=False)[0])[:, None]


def to_uint8_videos(videos: torch.Tensor) -> np.ndarray:
    """Decoded videos `[B, C, f, H, W]` in [-1, 1] → uint8 `[B, f, H, W, C]`."""
    batch, channels, frames, height, width = videos.shape
    images = videos.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
    return to_uint8_frames(images).reshape(batch, frames, height, width, channels)
