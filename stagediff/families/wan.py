"""Wan 2.1 text-to-video: UMT5 embeddings, a WanTransformer3DModel with CFG on a flow-matching
scheduler (`flow_shift`), AutoencoderKLWan decoded frame by frame into an MP4.

The pipeline runs the cond and uncond transformer passes one after the other; stagediff runs them as
one batch of 2 (`PairedGuidanceTransformer`), which the accelerator executes at once and a `dp` mesh
axis can split; the result equals the pipeline's within float tolerance. Step caches see the pair as one
call in the "cond" cache context: MagCache and TaylorSeer decide by step alone and treat the pair as two
items, so this keeps their results; First Block Cache decides from the whole call's activations, so with it
the passes stay apart, as the pipeline runs them.
"""

from __future__ import annotations

import torch

from stagediff.errors import StagediffError
from stagediff.families.base import FamilyAdapter, Settings, batch_on_device, to_uint8_videos

DEFAULTS = {"steps": 50, "guidance": 5.0, "height": 480, "width": 832, "frames": 81, "fps": 16}
"""WanPipeline's call defaults (480p, 81 frames) and Wan's native 16 frames per second."""
MAX_SEQUENCE_LENGTH = 512


class PairedGuidanceTransformer:
    """Stands in for the pipeline's transformer: when called for the conditional pass, it computes the
    conditional and unconditional passes as one batch and answers the following unconditional call
    (same latents, same timestep) from that batch. Any other call goes straight through."""

    def __init__(self, transformer, cond_embeds: torch.Tensor, uncond_embeds: torch.Tensor):
        self.transformer = transformer
        self.cond_embeds, self.uncond_embeds = cond_embeds, uncond_embeds
        self.pending = None

    def __getattr__(self, name):
        return getattr(self.__dict__["transformer"], name)

    def __call__(self, hidden_states, timestep, encoder_hidden_states, **kwargs):
        if encoder_hidden_states is self.cond_embeds:
            batch = hidden_states.shape[0]
            (both,) = self.transformer(
                hidden_states=torch.cat([hidden_states, hidden_states]),
                timestep=torch.cat([timestep, timestep]),
                encoder_hidden_states=torch.cat([self.cond_embeds, self.uncond_embeds]),
                **kwargs,
            )
            self.pending = (hidden_states, timestep, both[batch:])
            return (both[:batch],)
        if encoder_hidden_states is self.uncond_embeds and self.pending is not None:
            latents, step_timestep, uncond = self.pending
            if latents is hidden_states and step_timestep is timestep:
                self.pending = None
                return (uncond,)
        return self.transformer(
            hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states, **kwargs
        )


class Wan(FamilyAdapter):
    name = "wan"
    pipeline_class_names = ("WanPipeline",)
    encode_components = ("text_encoder", "tokenizer")
    denoise_components = ("scheduler", "transformer")
    decode_components = ("vae",)
    denoiser_component = "transformer"
    latents_field = "frames"
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

    def encode(self, pipe, prompt, negative_prompt, settings):
        embeds, negative_embeds = pipe.encode_prompt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=True,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            device=torch.device("cpu"),
        )
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds}

    def denoise(self, pipe, embeddings, generators, settings, on_step=None):
        batch = batch_on_device(pipe, embeddings)
        if "flow_shift" in settings.extras:
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, flow_shift=settings.extras["flow_shift"])
        if settings.cache is not None and settings.cache.decides_per_call:
            # The cache's skip decision must see cond and uncond apart, each in its own cache context, as
            # the pipeline calls them: a paired call would decide for both at once.
            return self.call_pipeline(pipe, batch, generators, settings, on_step, num_frames=settings.frames)
        transformer = pipe.transformer
        paired = PairedGuidanceTransformer(transformer, batch["prompt_embeds"], batch["negative_prompt_embeds"])
        object.__setattr__(pipe, "transformer", paired)
        try:
            return self.call_pipeline(pipe, batch, generators, settings, on_step, num_frames=settings.frames)
        finally:
            object.__setattr__(pipe, "transformer", transformer)

    @torch.no_grad()
    def decode(self, pipe, latents, settings):
        """Yield frames as the causal VAE decodes them: 1 for the first latent frame, then 4 per latent
        frame (the loop of AutoencoderKLWan._decode, kept streaming instead of concatenating). A
        tiled decode goes through the VAE's own `decode`, which yields every frame at once."""
        vae = pipe.vae
        latents = latents.to(vae.device, vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
        latents = latents * std + mean
        if vae.use_tiling:
            yield to_uint8_videos(vae.decode(latents, return_dict=False)[0])
            return
        vae.clear_cache()
        x = vae.post_quant_conv(latents)
        try:
            for index in range(x.shape[2]):
                vae._conv_idx = [0]
                frames = vae.decoder(
                    x[:, :, index : index + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=index == 0
                )
                if vae.config.patch_size is not None:
                    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

                    frames = unpatchify(frames, patch_size=vae.config.patch_size)
                yield to_uint8_videos(frames.clamp(-1.0, 1.0))
        finally:
            vae.clear_cache()
