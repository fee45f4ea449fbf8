"""FLUX.2: FLUX.2-dev (Flux2Pipeline: Mistral3 text encoder, embedded guidance) and FLUX.2-klein
(Flux2KleinPipeline: Qwen3 text encoder; classifier-free guidance for base models, none for
step-distilled ones).

Both read stacked hidden states of fixed text-encoder layers as the prompt embedding and denoise
packed latents `(1, (H/16)(W/16), 4C)` with the same transformer class. They return different
latents for `output_type="latent"`: Flux2Pipeline the packed latents before the VAE batch-norm
de-normalisation, Flux2KleinPipeline unpacked and de-normalised `(1, C, H/8, W/8)`; so the klein
pipeline needs its VAE (for the batch-norm statistics) in the denoise stage too.
"""

from __future__ import annotations

from stagediff.families.flux import FluxFamily

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 4.0
NO_GUIDANCE = 1.0
"""Recorded for step-distilled klein models, which run no CFG whatever the scale."""


class Flux2Family(FluxFamily):
    encode_components = ("text_encoder", "tokenizer")
    default_steps = DEFAULT_STEPS
    unsupported_cache_methods = {
        "fbcache": "diffusers 0.42's First Block Cache cannot bridge FLUX.2's double-stream first block and its "
                   "joint text+image single-stream last block (huggingface/diffusers#14280); use magcache or taylorseer",
    }
    text_encoder_out_layers: tuple[int, ...]
    """The text-encoder layers whose hidden states the pipeline stacks (its default)."""

    def encoder_settings(self, settings):
        return {**super().encoder_settings(settings), "text_encoder_out_layers": list(self.text_encoder_out_layers)}


class Flux2(Flux2Family):
    """FLUX.2-dev: embedded guidance, no negative prompt."""

    name = "flux2"
    pipeline_class_names = ("Flux2Pipeline",)
    uses_negative_prompt = False
    text_encoder_out_layers = (10, 20, 30)

    def pipeline_class(self):
        from diffusers import Flux2Pipeline

        return Flux2Pipeline

    def default_guidance(self, model_index, config_of):
        return DEFAULT_GUIDANCE


class Flux2Klein(Flux2Family):
    """FLUX.2-klein: CFG against a negative prompt (default empty) for base models; step-distilled
    models (`is_distilled` in model_index.json) run no CFG and need no negative embeddings."""

    name = "flux2-klein"
    pipeline_class_names = ("Flux2KleinPipeline",)
    # The pipeline de-normalises its latents with the VAE's batch-norm statistics even for
    # output_type="latent".
    denoise_components = ("scheduler", "transformer", "vae")
    text_encoder_out_layers = (9, 18, 27)

    def pipeline_class(self):
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline

    def default_guidance(self, model_index, config_of):
        return NO_GUIDANCE if model_index.get("is_distilled") else DEFAULT_GUIDANCE

    def default_extras(self, model_index, config_of):
        # Part of the embeddings key: base and distilled models share text encoders, but only
        # base models' embeddings hold a negative prompt.
        return {"distilled": bool(model_index.get("is_distilled", False))}

    def encoder_settings(self, settings):
        return {**super().encoder_settings(settings), "distilled": settings.extras["distilled"]}
