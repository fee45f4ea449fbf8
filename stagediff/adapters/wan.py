"""Wan 2.1's numerics: UMT5 embeddings, the pipeline's loop with its cond and uncond passes run as one
batch, and AutoencoderKLWan decoded frame by frame.

The pipeline runs the cond and uncond transformer passes one after the other; stagediff runs them as
one batch of 2 (`PairedGuidanceTransformer`), which the accelerator executes at once and a `dp` mesh
axis can split; the result equals the pipeline's within float tolerance. Step caches see the pair as one
call in the "cond" cache context: MagCache and TaylorSeer decide by step alone and treat the pair as two
items, so this keeps their results; First Block Cache decides from the whole call's activations, so with it
the passes stay apart, as the pipeline runs them.
"""

from __future__ import annotations

import torch

from stagediff.adapters.base import Adapter, batch_on_device, to_uint8_videos
from stagediff.families.wan import MAX_SEQUENCE_LENGTH, Wan


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


class WanAdapter(Adapter):
    family = Wan()
    latents_field = "frames"

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
