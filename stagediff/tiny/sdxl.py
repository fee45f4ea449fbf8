"""Tiny random-init SDXL: the real StableDiffusionXLPipeline classes with small configs."""

from __future__ import annotations

from pathlib import Path

import torch

from stagediff.tiny.tokenizers import clip_config_ids, save_clip_tokenizer


def _text(hidden: int, layers: int, heads: int, intermediate: int) -> dict:
    return {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "intermediate_size": intermediate, "projection_dim": hidden}


TWO_LEVELS = {"down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
              "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D")}
SMALL_VAE = {"block_out_channels": (16, 32, 32, 32), "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 128}
SCALES = {
    "tiny": {
        "text": (_text(32, 5, 4, 37),) * 2, "time_embed": 8, "vae": SMALL_VAE,
        "unet": dict(block_out_channels=(32, 64), attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
                     norm_num_groups=1, sample_size=16, **TWO_LEVELS),
    },
    # ~90M parameters: enough that the UNet's compute dominates, as in the real model (benchmarks).
    "small": {
        "text": (_text(256, 6, 4, 1024),) * 2, "time_embed": 8, "vae": SMALL_VAE,
        "unet": dict(block_out_channels=(128, 320), attention_head_dim=(4, 8), transformer_layers_per_block=(1, 2),
                     norm_num_groups=32, sample_size=64, **TWO_LEVELS),
    },
    # The real SDXL: UNet (2.6B parameters), VAE, CLIP ViT-L and OpenCLIP bigG text encoders.
    "full": {
        "text": ({**_text(768, 12, 12, 3072), "vocab_size": 49408, "hidden_act": "quick_gelu"},
                 {**_text(1280, 32, 20, 5120), "vocab_size": 49408}), "time_embed": 256,
        "vae": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32,
                "sample_size": 1024},
        "unet": dict(block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
                     transformer_layers_per_block=(1, 2, 10), norm_num_groups=32, sample_size=128,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
    },
}
"""Model sizes by name: `tiny` for tests and the demo, `small` for CPU benchmarks, `full` for GPU benchmarks."""


def denoiser(scale: str):
    """The random-init UNet of `scale` (on the current default device)."""
    from diffusers import UNet2DConditionModel

    dims = SCALES[scale]
    text, text_2 = dims["text"]
    return UNet2DConditionModel(
        layers_per_block=2,
        in_channels=4,
        out_channels=4,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=dims["time_embed"],
        # The pooled embedding comes from the second encoder; cross-attention reads both, concatenated.
        projection_class_embeddings_input_dim=6 * dims["time_embed"] + text_2["hidden_size"],
        cross_attention_dim=text["hidden_size"] + text_2["hidden_size"],
        **dims["unet"],
    )


def autoencoder(scale: str):
    """The random-init AutoencoderKL of `scale` (on the current default device; `full`: SDXL's VAE)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        scaling_factor=0.13025,
        **SCALES[scale]["vae"],
    )


def text_encoders(scale: str, seed: int = 0) -> tuple:
    """The random-init CLIP text encoders of `scale` (on the current default device); `full` ones have
    the real vocabulary size, which the small offline tokenizer's ids stay inside."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    shared = {**clip_config_ids(), "layer_norm_eps": 1e-05, "hidden_act": "gelu"}
    text, text_2 = SCALES[scale]["text"]
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**shared, **text}))
    torch.manual_seed(seed + 3)
    return text_encoder, CLIPTextModelWithProjection(CLIPTextConfig(**{**shared, **text_2}))


def build(folder: Path, seed: int = 0, scale: str = "tiny") -> Path:
    """Write a random-init SDXL checkpoint of the given scale (diffusers layout) to `folder`."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(seed)
    unet = denoiser(scale)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        prediction_type="epsilon",
    )
    torch.manual_seed(seed + 1)
    vae = autoencoder(scale)
    text_encoder, text_encoder_2 = text_encoders(scale, seed)

    folder = Path(folder)
    tokenizer = save_clip_tokenizer(folder / "tokenizer")
    tokenizer_2 = save_clip_tokenizer(folder / "tokenizer_2", pad_token="!")
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )
    pipeline.save_pretrained(folder)
    return folder
