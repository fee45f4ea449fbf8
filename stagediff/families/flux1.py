"""FLUX.1 (dev, schnell and their fine-tunes): CLIP pooled + T5 sequence embeddings, a
FluxTransformer2DModel with embedded guidance (dev) or none (schnell), optional true CFG.

`--guidance` is the embedded guidance (`guidance_scale`); a model without a guidance embedding
(schnell) ignores it. True classifier-free guidance (`true_cfg_scale`, a second transformer pass
per step) runs when a negative prompt is given and the `true_cfg` option is above 1, as in
FluxPipeline.
"""

from __future__ import annotations

import numbers

from stagediff.errors import StagediffError
from stagediff.families.flux import FluxFamily

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
    ships_magcache_ratios = True

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

    def validate(self, settings, config_of):
        super().validate(settings, config_of)
        true_cfg = settings.extras["true_cfg"]
        if isinstance(true_cfg, bool) or not isinstance(true_cfg, numbers.Real) or not true_cfg >= 1:
            raise StagediffError(f"--true-cfg {true_cfg!r} must be a number of at least 1 for {self.name}")
