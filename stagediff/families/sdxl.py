"""SDXL: two CLIP text encoders, a UNet with micro-conditioning and CFG, AutoencoderKL."""

from __future__ import annotations

import torch

from stagediff.families.base import FamilyAdapter, Settings, decode_images

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 5.0


class SDXL(FamilyAdapter):
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
