"""FLUX.1 (dev, schnell and their fine-tunes): CLIP pooled + T5 sequence embeddings, a
FluxTransformer2DModel with embedded guidance (dev) or none (schnell), optional true CFG.

`--guidance` is the embedded guidance (`guidance_scale`); a model without a guidance embedding
(schnell) ignores it. True classifier-free guidance (`true_cfg_scale`, a second transformer pass
per step) runs when a negative prompt is given and the `true_cfg` option is above 1, as in
FluxPipeline.
"""

from __future__ import annotations

import numbers

import torch

from stagediff.errors import StagediffError
from stagediff.families.flux import MAX_SEQUENCE_LENGTH, FluxFamily

DEFAULT_STEPS = 28
DEFAULT_GUIDANCE = 3.5
NO_GUIDANCE = 0.0
"""Recorded for models without a guidance embedding, which ignore the value."""
DEFAULT_TRUE_CFG = 1.0


class Flux1(FluxFamily):
    name = "flux1"
    pipeline_class_names = ("FluxPipeline",)
    encode_components = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    default_steps = DEFAULT_STEPS

    def pipeline_class(self):
        from diffusers import FluxPipeline

        return FluxPipeline

    def lora_state_dict(self, path, config_of):
        state_dict, alphas, metadata = self.pipeline_class().lora_state_dict(
            str(path), return_alphas=True, use_safetensors=True, return_lora_metadata=True
        )
        return state_dict, alphas or None, metadata

    def default_guidance(self, model_index, config_of):
        return DEFAULT_GUIDANCE if config_of("transformer").get("guidance_embeds") else NO_GUIDANCE

    def default_extras(self, model_index, config_of):
        return {"true_cfg": DEFAULT_TRUE_CFG}

    def shipped_magcache_ratios(self):
        # MagCache's ratios for FLUX.1 (dev and schnell), as diffusers ships them (calibrated on 28 steps).
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        return FLUX_MAG_RATIOS.tolist()

    def validate(self, settings, config_of):
        super().validate(settings, config_of)
        true_cfg = settings.extras["true_cfg"]
        if isinstance(true_cfg, bool) or not isinstance(true_cfg, numbers.Real) or not true_cfg >= 1:
            raise StagediffError(f"--true-cfg {true_cfg!r} must be a number of at least 1 for {self.name}")

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
