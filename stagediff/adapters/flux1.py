"""FLUX.1's numerics: CLIP pooled + T5 embeddings (and the negative prompt's for true CFG), embedded
guidance and `true_cfg_scale`, unpacking latents for the VAE."""

from __future__ import annotations

import torch

from stagediff.adapters.flux import FluxAdapter
from stagediff.families.flux import MAX_SEQUENCE_LENGTH
from stagediff.families.flux1 import Flux1


class Flux1Adapter(FluxAdapter):
    family = Flux1()

    def magcache_ratios(self):
        # MagCache's ratios for FLUX.1 (dev and schnell), as diffusers ships them (calibrated on 28 steps).
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        return FLUX_MAG_RATIOS.tolist()

    def encode(self, pipe, prompt, negative_prompt, settings):
        tensors = self._encode_one(pipe, prompt, "")
        # Without a negative prompt FluxPipeline runs no true CFG, whatever `true_cfg_scale` says.
        if negative_prompt is not None:
            tensors.update(self._encode_one(pipe, negative_prompt, "negative_"))
        return tensors

    @staticmethod
    def _encode_one(pipe, text: str, prefix: str) -> dict[str, torch.Tensor]:
        embeds, pooled, _text_ids = pipe.encode_prompt(
            prompt=text, device=torch.device("cpu"), num_images_per_prompt=1, max_sequence_length=MAX_SEQUENCE_LENGTH
        )
        return {f"{prefix}prompt_embeds": embeds, f"{prefix}pooled_prompt_embeds": pooled}

    def guidance_arguments(self, settings):
        return {"guidance_scale": settings.guidance, "true_cfg_scale": settings.extras["true_cfg"]}

    def latents_for_vae(self, pipe, latents, settings):
        vae = pipe.vae
        latents = pipe._unpack_latents(latents, settings.height, settings.width, pipe.vae_scale_factor)
        return latents / vae.config.scaling_factor + vae.config.shift_factor
