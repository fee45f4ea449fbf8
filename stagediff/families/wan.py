"""Wan 2.1 text-to-video: UMT5 embeddings, a WanTransformer3DModel with CFG on a flow-matching
scheduler (`flow_shift`), AutoencoderKLWan decoded frame by frame into an MP4."""

from __future__ import annotations

from stagediff.errors import StagediffError
from stagediff.families.base import Family, Settings

DEFAULTS = {"steps": 50, "guidance": 5.0, "height": 480, "width": 832, "frames": 81, "fps": 16}
"""WanPipeline's call defaults (480p, 81 frames) and Wan's native 16 frames per second."""
MAX_SEQUENCE_LENGTH = 512


class Wan(Family):
    name = "wan"
    pipeline_class_names = ("WanPipeline",)
    encode_components = ("text_encoder", "tokenizer")
    denoise_components = ("scheduler", "transformer")
    decode_components = ("vae",)
    denoiser_component = "transformer"
    media_extension = "mp4"
    unsupported_cache_methods = {
        "taylorseer-attention": "diffusers' TaylorSeer caches modules whose names end in attn, and Wan's blocks name "
                                "theirs attn1 and attn2, so it would cache nothing; use taylorseer",
    }

    def pipeline_class(self):
        from diffusers import WanPipeline

        return WanPipeline

    def default_settings(self, model_index, config_of):
        flow_shift = config_of("scheduler").get("flow_shift")
        extras = {"flow_shift": flow_shift} if flow_shift is not None else {}
        return Settings(**DEFAULTS, extras=extras)

    def size_multiple(self, config_of):
        patch = config_of("transformer")["patch_size"]
        return config_of("vae").get("scale_factor_spatial", 8) * patch[1]

    def validate(self, settings, config_of):
        super().validate(settings, config_of)
        temporal = config_of("vae").get("scale_factor_temporal", 4)
        if settings.frames < 1 or (settings.frames - 1) % temporal:
            raise StagediffError(f"--frames {settings.frames} must be {temporal}n+1 (1, 5, 9, ..., 81) for {self.name}")
        flow_shift = settings.extras.get("flow_shift")
        if flow_shift is not None and not flow_shift > 0:
            raise StagediffError(f"--flow-shift {flow_shift} must be positive for {self.name}")

    def encoder_settings(self, settings):
        return {"max_sequence_length": MAX_SEQUENCE_LENGTH}
