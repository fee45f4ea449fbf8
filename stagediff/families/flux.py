"""What every FLUX pipeline (FLUX.1, FLUX.2, FLUX.2-klein) shares: a transformer over 2×2 patches of
the VAE latents, sizes in multiples of twice the VAE factor, 1024² by default, prompts of at most 512
tokens."""

from __future__ import annotations

from abc import abstractmethod

from stagediff.families.base import Family, Settings

DEFAULT_SAMPLE_SIZE = 128
"""The pipelines' `default_sample_size`, in latent pixels: 1024 image pixels with a VAE factor of 8."""
MAX_SEQUENCE_LENGTH = 512
"""The pipelines' default `max_sequence_length` for the text encoder."""


class FluxFamily(Family):
    denoise_components = ("scheduler", "transformer")
    decode_components = ("vae",)
    denoiser_component = "transformer"
    default_steps: int

    @abstractmethod
    def default_guidance(self, model_index: dict, config_of) -> float:
        """The guidance the pipeline applies by default (a neutral value where the model has none)."""

    def default_extras(self, model_index: dict, config_of) -> dict:
        """Family options beyond the common settings, with their defaults."""
        return {}

    def vae_factor(self, config_of) -> int:
        return 2 ** (len(config_of("vae")["block_out_channels"]) - 1)

    def size_multiple(self, config_of):
        # Latents are packed in 2×2 patches.
        return 2 * self.vae_factor(config_of)

    def default_settings(self, model_index, config_of):
        size = DEFAULT_SAMPLE_SIZE * self.vae_factor(config_of)
        return Settings(
            steps=self.default_steps,
            guidance=self.default_guidance(model_index, config_of),
            height=size,
            width=size,
            extras=self.default_extras(model_index, config_of),
        )

    def encoder_settings(self, settings):
        return {"max_sequence_length": MAX_SEQUENCE_LENGTH}
