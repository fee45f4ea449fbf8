"""Tiny random-init Wan 2.1 text-to-video: the real WanPipeline classes (UMT5, WanTransformer3DModel,
AutoencoderKLWan, UniPC flow-matching scheduler) with small configs."""

from __future__ import annotations

from pathlib import Path

import torch

from stagediff.tiny.tokenizers import save_t5_tokenizer

TEXT_HIDDEN = 32
FLOW_SHIFT = 3.0
"""Wan 2.1 checkpoints ship flow_shift 3.0 (the 480p setting)."""
TRANSFORMER_SCALES = {
    "tiny": dict(num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=2, rope_max_seq_len=32),
    "small": dict(num_attention_heads=8, attention_head_dim=64, ffn_dim=2048, num_layers=10, rope_max_seq_len=1024),
}
"""WanTransformer3DModel sizes by scale (small: ~45M parameters)."""


def build(folder: Path, seed: int = 0, scale: str = "tiny") -> Path:
    """Write a random-init Wan 2.1 T2V checkpoint (diffusers layout, model_index.json) to `folder`."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = save_t5_tokenizer(folder / "tokenizer")
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        in_channels=16,
        out_channels=16,
        text_dim=TEXT_HIDDEN,
        freq_dim=256,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        **TRANSFORMER_SCALES[scale],
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    torch.manual_seed(seed + 2)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=TEXT_HIDDEN,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=FLOW_SHIFT, num_train_timesteps=1000
    )
    pipeline = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )
    pipeline.save_pretrained(folder)
    return folder
