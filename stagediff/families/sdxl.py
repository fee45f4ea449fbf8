"""SDXL: two CLIP text encoders, a UNet with micro-conditioning and CFG, AutoencoderKL."""

from __future__ import annotations

from stagediff.families.base import Family, Settings

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 5.0


class SDXL(Family):
    name = "sdxl"
    pipeline_class_names = ("StableDiffusionXLPipeline",)
    encode_components = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
    denoise_components = ("unet", "scheduler")
    decode_components = ("vae",)
    denoiser_component = "unet"
    step_cache_hooks = False

    def pipeline_class(self):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def lora_state_dict(self, path, config_of):
        from diffusers.configuration_utils import FrozenDict

        # The UNet's config maps kohya's SGM block names onto diffusers' blocks.
        return self.pipeline_class().lora_state_dict(str(path), unet_config=FrozenDict(config_of("unet")),
                                                     use_safetensors=True, return_lora_metadata=True)

    def default_settings(self, model_index, config_of):
        size = config_of("unet")["sample_size"] * self.size_multiple(config_of)
        return Settings(steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE, height=size, width=size)

    def size_multiple(self, config_of):
        return 2 ** (len(config_of("vae")["block_out_channels"]) - 1)
