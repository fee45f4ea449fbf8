"""Tiny random-init FLUX.2: the real Flux2Pipeline (Mistral3 text encoder, embedded guidance) and
Flux2KleinPipeline (Qwen3 text encoder; distilled, or base with CFG) classes with small configs.

The text encoders have as many layers as the pipelines read hidden states from (FLUX.2-dev layers
10/20/30, klein 9/18/27), with a tiny width.
"""

from __future__ import annotations

from pathlib import Path

import torch

from stagediff.tiny.tokenizers import save_mistral_tokenizer, save_qwen_tokenizer

TEXT_HIDDEN = 16
LATENT_CHANNELS = 4
MISTRAL_LAYERS = 30
QWEN_LAYERS = 27
TRANSFORMER_SCALES = {
    "tiny": dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16,
                 axes_dims_rope=(4, 4, 4, 4)),
    "small": dict(num_layers=4, num_single_layers=8, num_attention_heads=8, attention_head_dim=64,
                  axes_dims_rope=(16, 16, 16, 16)),
}
"""Flux2Transformer2DModel sizes by scale (small: ~45M parameters)."""
KLEIN_4B = dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680)
"""FLUX.2-klein 4B's transformer where it differs from FLUX.2-dev's (Qwen3-4B: 3 × 2560 text features)."""


def build(folder: Path, seed: int = 0, scale: str = "tiny") -> Path:
    """Write a random-init FLUX.2-dev style checkpoint (diffusers layout, model_index.json) to `folder`."""
    from diffusers import Flux2Pipeline

    folder = Path(folder)
    tokenizer = save_mistral_tokenizer(folder / "tokenizer")
    torch.manual_seed(seed + 2)
    text_encoder = _mistral3_text_encoder(tokenizer)
    pipeline = Flux2Pipeline(
        text_encoder=text_encoder, tokenizer=tokenizer, **_image_components(seed, scale, guidance_embeds=True)
    )
    pipeline.save_pretrained(folder)
    return folder


def build_klein(folder: Path, seed: int = 0, scale: str = "tiny") -> Path:
    """Write a random-init FLUX.2-klein style checkpoint (step-distilled: no CFG) to `folder`."""
    return _build_klein(Path(folder), seed, scale, is_distilled=True)


def build_klein_base(folder: Path, seed: int = 0, scale: str = "tiny") -> Path:
    """Write a random-init FLUX.2-klein-base style checkpoint (CFG with an empty negative prompt) to `folder`."""
    return _build_klein(Path(folder), seed, scale, is_distilled=False)


def _build_klein(folder: Path, seed: int, scale: str, is_distilled: bool) -> Path:
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = save_qwen_tokenizer(folder / "tokenizer")
    torch.manual_seed(seed + 2)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_HIDDEN,
            intermediate_size=32,
            num_hidden_layers=QWEN_LAYERS,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    pipeline = Flux2KleinPipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        is_distilled=is_distilled,
        **_image_components(seed, scale, guidance_embeds=False),
    )
    pipeline.save_pretrained(folder)
    return folder


def _image_components(seed: int, scale: str, guidance_embeds: bool) -> dict:
    """Transformer, scheduler and VAE shared by both FLUX.2 pipelines."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    transformer = denoiser(scale, guidance_embeds)
    torch.manual_seed(seed + 1)
    vae = autoencoder(scale)
    # A freshly initialised batch norm is the identity (mean 0, variance 1); give it statistics so the
    # latent de-normalisation is visible in the numbers.
    generator = torch.Generator().manual_seed(seed + 4)
    vae.bn.running_mean.copy_(torch.randn(vae.bn.num_features, generator=generator) * 0.5)
    vae.bn.running_var.copy_(torch.rand(vae.bn.num_features, generator=generator) + 0.5)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    return {"transformer": transformer, "vae": vae, "scheduler": scheduler}


def denoiser(scale: str, guidance_embeds: bool = True):
    """The random-init Flux2Transformer2DModel of `scale` (on the current default device). `full` is
    FLUX.2-dev's (diffusers' defaults) with guidance embeds, FLUX.2-klein 4B's without."""
    from diffusers import Flux2Transformer2DModel

    if scale == "full":
        return Flux2Transformer2DModel(**({} if guidance_embeds else KLEIN_4B), guidance_embeds=guidance_embeds)
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        joint_attention_dim=3 * TEXT_HIDDEN,
        timestep_guidance_channels=256,
        guidance_embeds=guidance_embeds,
        **TRANSFORMER_SCALES[scale],
    )


def autoencoder(scale: str):
    """The random-init AutoencoderKLFlux2 of `scale` (on the current default device; `full`: FLUX.2's VAE,
    diffusers' defaults)."""
    from diffusers import AutoencoderKLFlux2

    if scale == "full":
        return AutoencoderKLFlux2()
    # Four blocks: the VAE factor of 8 that the pipelines also assume when their VAE is not loaded.
    return AutoencoderKLFlux2(
        block_out_channels=(8, 16, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=LATENT_CHANNELS,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
    )


def _mistral3_text_encoder(tokenizer):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": len(tokenizer),
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 32,
            "num_hidden_layers": MISTRAL_LAYERS,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "max_position_embeddings": 1024,
            "sliding_window": None,
            **special,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "num_channels": 3,
        },
        image_token_index=tokenizer.unk_token_id,
        **special,
    )
    return Mistral3ForConditionalGeneration(config)
