"""What a model family is, as planning sees it: which diffusers pipeline it reproduces, which
components each stage loads, the defaults the pipeline chooses, which settings change which
artifact's bytes, and what it cannot run.

No tensor code here (this module and its family modules import no torch): the numerics of each
family (how prompts become embeddings, how latents become pixels) are its adapter in
`stagediff.adapters`, which only the stages load.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stagediff.errors import StagediffError

if TYPE_CHECKING:
    from stagediff.cache_spec import StepCache


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


class Family(ABC):
    """One model family (SDXL, FLUX.1, ...): its pipeline, components, defaults and key settings."""

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
    step_cache_hooks: bool = True
    """Whether diffusers has step-cache hooks (`enable_cache`) for this family's denoiser."""
    unsupported_cache_methods: dict[str, str] = {}
    """Step-cache methods that cannot run on this family, with the reason."""
    ships_magcache_ratios: bool = False
    """Whether diffusers ships MagCache's magnitude ratios for this family (its adapter reads them)."""

    def components_of(self, stage: str) -> tuple[str, ...]:
        """The pipeline components a stage loads (`encode`, `denoise` or `decode`)."""
        return {"encode": self.encode_components, "denoise": self.denoise_components,
                "decode": self.decode_components}[stage]

    @abstractmethod
    def pipeline_class(self) -> type:
        """The diffusers pipeline class whose components and numerics this family reproduces (imported
        when called)."""

    def lora_state_dict(self, path: Path, config_of: Callable[[str], dict]) -> tuple[dict, dict | None, dict | None]:
        """A LoRA file's weights as the pipeline's own loader reads them (kohya and other formats converted,
        keys prefixed by component), with their network alphas and adapter metadata (safetensors only)."""
        state_dict, metadata = self.pipeline_class().lora_state_dict(str(path), use_safetensors=True,
                                                                      return_lora_metadata=True)
        return state_dict, None, metadata

    @abstractmethod
    def default_settings(self, model_index: dict, config_of: Callable[[str], dict]) -> Settings:
        """Defaults as the diffusers pipeline chooses them; `config_of(component)` reads a config."""

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
