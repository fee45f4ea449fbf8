"""Tiny random-init SDXL: the real StableDiffusionXLPipeline classes with small configs."""

from __future__ import annotations

from pathlib import Path

import torch

from stagediff.tiny.tokenizers import CLIP_SPECIAL_TOKENS, clip_vocab, save_clip_tokenizer

TEXT_HIDDEN = 32
TEXT_PROJECTION = 32
TIME_EMBED_DIM = 8


def build(folder: Path, seed: int = 0) -> Path:
    """Write a tiny SDXL checkpoint (diffusers layout, model_index.json) to `folder`."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab = clip_vocab()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_PROJECTION,
        cross_attention_dim=2 * TEXT_HIDDEN,
        norm_num_groups=1,
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
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=len(vocab),
        hidden_act="gelu",
        projection_dim=TEXT_PROJECTION,
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
