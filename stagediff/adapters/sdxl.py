"""SDXL's numerics: the pipeline's `encode_prompt` for both CLIP encoders, the pipeline's own loop, and
AutoencoderKL's decode after the pipeline's latent de-normalisation."""

from __future__ import annotations

import torch

from stagediff.adapters.base import Adapter, decode_images
from stagediff.families.sdxl import SDXL


class SDXLAdapter(Adapter):
    family = SDXL()

    def encode(self, pipe, prompt, negative_prompt, settings):
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompt,
            device=torch.device("cpu"),
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negative_prompt,
        )
        return {
            "prompt_embeds": embeds,
            "negative_prompt_embeds": negative_embeds,
            "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": negative_pooled,
        }

    def vae_dtype(self, vae):
        # The pipeline decodes fp16 VAEs in float32 (they overflow): same rule here.
        return torch.float32 if vae.dtype == torch.float16 and vae.config.force_upcast else vae.dtype

    def decode(self, pipe, latents, settings):
        vae = pipe.vae
        latents = latents.to(vae.device, vae.dtype)
        mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        yield decode_images(vae, latents)
