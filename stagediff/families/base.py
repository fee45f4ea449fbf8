"""The protocol every model family implements, and the settings it resolves.

A family adapter owns only the numerics that differ between model families: which pipeline
components each stage needs, how prompts become embedding tensors, how the denoise loop turns
embeddings and seeds into latents, and how latents become pixels. Loading, storing, keys,
batching and orchestration are shared and live elsewhere.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stagediff.errors import StagediffError

if TYPE_CHECKING:
    from stagediff.step_cache import StepCache

StepCallback = Callable[[int, int], None]
"""Called as `on_step(step_index, total_steps)` after each denoise step."""


@dataclass(frozen=True)
class Settings:
    """Fully resolved generation settings: the user's options with the family's defaults filled in."""

    steps: int
    guidance: float
    height: int
    width: int
    dtype: str = "float32"
    frames: int | None = None
    fps: int | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    vae_tiling: bool = False
    """Decode in tiles even when one piece would fit the device."""
    cache: "StepCache | None" = None
    """The step cache (`--cache`), None for exact denoising."""

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)


class FamilyAdapter(ABC):
    """One model family (SDXL, FLUX.1, ...) behind the three stage operations."""

    name: str
    """Family name used in the store layout and CLI (`sdxl`, `flux1`, ...)."""
    pipeline_class_names: tuple[str, ...]
    """`_class_name` values of model_index.json that this family handles."""
    encode_components: tuple[str, ...]
    denoise_components: tuple[str, ...]
    decode_components: tuple[str, ...]
    denoiser_component: str
    """The component the denoise backend compiles (`unet` or `transformer`)."""
    media_extension: str = "png"
    default_negative_prompt: str = ""
    uses_negative_prompt: bool = True
    """False for families whose pipeline takes no negative prompt: asking for one is an error."""
    latents_field: str = "images"
    """The field of the pipeline's output that holds latents with `output_type="latent"`."""
    step_cache_hooks: bool = True
    """Whether diffusers has step-cache hooks (`enable_cache`) for this family's denoiser."""
    unsupported_cache_methods: dict[str, str] = {}
    """Step-cache methods that cannot run on this family, with the reason."""

    @abstractmethod
    def pipeline_class(self) -> type:
        """The diffusers pipeline class whose components and numerics this family reproduces."""

    def lora_state_dict(self, path: Path, config_of: Callable[[str], dict]) -> tuple[dict, dict | None, dict | None]:
        """A LoRA file's weights as the pipeline's own loader reads them (kohya and other formats converted,
        keys prefixed by component), with their network alphas and adapter metadata (safetensors only)."""
        state_dict, metadata = self.pipeline_class().lora_state_dict(str(path), use_safetensors=True,
                                                                      return_lora_metadata=True)
        return state_dict, None, metadata

    def own_components(self, folder: Path, names: tuple[str, ...]) -> dict[str, Any]:
        """Components among `names` that this family loads itself rather than through the diffusers
        pipeline's loader (which then skips them); none by default."""
        return {}

    @abstractmethod
    def default_settings(self, model_index: dict, config_of: Callable[[str], dict]) -> Settings:
        """Defaults as the diffusers pipeline chooses them; `config_of(component)` reads a config."""

    def shipped_magcache_ratios(self) -> list[float] | None:
        """MagCache's magnitude ratios for this family as diffusers ships them, if it does."""
        return None

    def size_multiple(self, config_of: Callable[[str], dict]) -> int:
        """Height and width must be multiples of this (the VAE factor, times the patch size)."""
        return 8

    def validate(self, settings: Settings, config_of: Callable[[str], dict]) -> None:
        """Raise StagediffError for settings this family cannot run."""
        multiple = self.size_multiple(config_of)
        for name in ("height", "width"):
            value = getattr(settings, name)
            if value < multiple or value % multiple:
                raise StagediffError(f"--{name} {value} must be a positive multiple of {multiple} for {self.name}")

    def encoder_settings(self, settings: Settings) -> dict:
        """Settings that change the embedding bytes (besides prompt, negative prompt, dtype)."""
        return {}

    def denoise_settings(self, settings: Settings) -> dict:
        """Settings that change the latent bytes (besides embeddings, seed and dtype)."""
        denoise = {
            "steps": settings.steps,
            "guidance": settings.guidance,
            "height": settings.height,
            "width": settings.width,
            "frames": settings.frames,
            **settings.extras,
        }
        if settings.cache is not None:
            denoise["cache"] = settings.cache.settings
        return denoise

    def decode_settings(self, settings: Settings) -> dict:
        """Settings that change the media bytes (besides the latents). Tiling chosen for memory is
        left out: it depends on the decoding device, and the media records it."""
        tiling = {"vae_tiling": True} if settings.vae_tiling else {}
        return {"format": self.media_extension, "fps": settings.fps, **tiling}

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
