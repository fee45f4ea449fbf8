"""Tiny random-init FLUX.1: the real FluxPipeline classes (CLIP + T5, FluxTransformer2DModel,
AutoencoderKL) with small configs. `build` makes a dev-style model (embedded guidance, dynamic
shifting); `build_schnell` a schnell-style one (no guidance embedding, fixed shift)."""

from __future__ import annotations

from pathlib import Path

import torch

from stagediff.tiny.tokenizers import clip_config_ids, save_clip_tokenizer, save_t5_tokenizer, t5_config_ids

TRANSFORMER_SCALES = {
    "tiny": dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6)),
    "small": dict(num_layers=4, num_single_layers=8, num_attention_heads=8, attention_head_dim=64,
                  axes_dims_rope=(16, 24, 24)),
    "full": dict(num_layers=19, num_single_layers=38, num_attention_heads=24, attention_head_dim=128,
                 axes_dims_rope=(16, 56, 56)),
}
"""FluxTransformer2DModel sizes by scale (small: ~70M parameters; full: FLUX.1's 12B)."""
SMALL_PARTS = {
    "clip": dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2),
    "t5": dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4),
    "latent_channels": 4,
    "vae": dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=32),
}
PARTS = {
    "tiny": SMALL_PARTS,
    "small": SMALL_PARTS,
    # FLUX.1's VAE and text encoders: CLIP ViT-L and T5-XXL (real vocabulary sizes; the small offline
    # tokenizers' ids stay inside them).
    "full": {
        "clip": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                     vocab_size=49408, hidden_act="quick_gelu"),
        "t5": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
                   vocab_size=32128, relative_attention_num_buckets=32),
        "latent_channels": 16,
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=1024),
    },
}
"""Text encoders and VAE by scale."""


def build(folder: Path, seed: int = 0, scale: str = "tiny") -> Path:
    """Write a random-init FLUX.1-dev style checkpoint (diffusers layout, model_index.json) to `folder`."""
    return _build(Path(folder), seed, scale, guidance_embeds=True)


def build_schnell(folder: Path, seed: int = 0, scale: str = "tiny") -> Path:
    """Write a random-init FLUX.1-schnell style checkpoint to `folder`."""
    return _build(Path(folder), seed, scale, guidance_embeds=False)


def denoiser(scale: str, guidance_embeds: bool = True):
    """The random-init FluxTransformer2DModel of `scale` (on the current default device)."""
    from diffusers import FluxTransformer2DModel

    parts = PARTS[scale]
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * parts["latent_channels"],
        joint_attention_dim=parts["t5"]["d_model"],
        pooled_projection_dim=parts["clip"]["hidden_size"],
        guidance_embeds=guidance_embeds,
        **TRANSFORMER_SCALES[scale],
    )


def autoencoder(scale: str):
    """The random-init AutoencoderKL of `scale` (on the current default device; `full`: FLUX.1's VAE)."""
    from diffusers import AutoencoderKL

    parts = PARTS[scale]
    # Four blocks: the VAE factor of 8 that the pipeline also assumes when its VAE is not loaded.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=parts["latent_channels"],
        **parts["vae"],
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def text_encoders(scale: str, t5_tokenizer, seed: int = 0) -> tuple:
    """The random-init CLIP and T5 encoders of `scale` (on the current default device)."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    parts = PARTS[scale]
    torch.manual_seed(seed + 2)
    clip = CLIPTextModel(CLIPTextConfig(**{**clip_config_ids(), "projection_dim": parts["clip"]["hidden_size"],
                                           **parts["clip"]}))
    torch.manual_seed(seed + 3)
    t5 = T5EncoderModel(T5Config(**{**t5_config_ids(t5_tokenizer), "relative_attention_num_buckets": 8, **parts["t5"]}))
    return clip, t5


def _build(folder: Path, seed: int, scale: str, guidance_embeds: bool) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(seed)
    transformer = denoiser(scale, guidance_embeds)
    # FLUX.1-dev shifts the schedule with the image size; schnell uses a fixed shift of 1.
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0 if guidance_embeds else 1.0,
        use_dynamic_shifting=guidance_embeds,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
    )
    torch.manual_seed(seed + 1)
    vae = autoencoder(scale)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = save_clip_tokenizer(folder / "tokenizer")
    tokenizer_2 = save_t5_tokenizer(folder / "tokenizer_2")
    text_encoder, text_encoder_2 = text_encoders(scale, tokenizer_2, seed)
    pipeline = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipeline.save_pretrained(folder)
    return folder
