"""Tiny random-init SDXL: the real StableDiffusionXLPipeline classes with small configs."""

from __future__ import annotations

from pathlib import Path

import torch

from stagediff.tiny.tokenizers import CLIP_SPECIAL_TOKENS, clip_vocab, save_clip_tokenizer

TIME_EMBED_DIM = 8

SCALES = {
    "tiny": {
        "text_hidden": 32, "text_layers": 5, "text_heads": 4, "text_intermediate": 37,
        "unet_channels": (32, 64), "unet_heads": (2, 4), "unet_transformer_layers": (1, 2), "unet_groups": 1,
        "sample_size": 16,
    },
    # ~90M parameters: enough that the UNet's compute dominates, as in the real model (benchmarks).
    "small": {
        "text_hidden": 256, "text_layers": 6, "text_heads": 4, "text_intermediate": 1024,
        "unet_channels": (128, 320), "unet_heads": (4, 8), "unet_transformer_layers": (1, 2), "unet_groups": 32,
        "sample_size": 64,
    },
}
"""Model sizes by name: `tiny` for tests and the demo, `small` for benchmarks."""


def build(folder: Path, seed: int = 0, scale: str = "tiny") -> Path:
    """Write a random-init SDXL checkpoint of the given scale (diffusers layout) to `folder`."""
    dims = SCALES[scale]
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab = clip_vocab()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=dims["unet_channels"],
        layers_per_block=2,
        sample_size=dims["sample_size"],
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=dims["unet_heads"],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        transformer_layers_per_block=dims["unet_transformer_layers"],
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + dims["text_hidden"],
        cross_attention_dim=2 * dims["text_hidden"],
        norm_num_groups=dims["unet_groups"],
    )
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
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=0.13025,
    )
    text_config = CLIPTextConfig(
        bos_token_id=vocab[CLIP_SPECIAL_TOKENS[0]],
        eos_token_id=vocab[CLIP_SPECIAL_TOKENS[1]],
        pad_token_id=vocab[CLIP_SPECIAL_TOKENS[1]],
        hidden_size=dims["text_hidden"],
        intermediate_size=dims["text_intermediate"],
        layer_norm_eps=1e-05,
        num_attention_heads=dims["text_heads"],
        num_hidden_layers=dims["text_layers"],
        vocab_size=len(vocab),
        hidden_act="gelu",
        projection_dim=dims["text_hidden"],
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)

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
