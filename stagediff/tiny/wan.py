"""Tiny random-init Wan 2.1 text-to-video: the real WanPipeline classes (UMT5, WanTransformer3DModel,
AutoencoderKLWan, UniPC flow-matching scheduler) with small configs."""

from __future__ import annotations

from pathlib import Path

import torch

from stagediff.tiny.tokenizers import save_t5_tokenizer

FLOW_SHIFT = 3.0
"""Wan 2.1 checkpoints ship flow_shift 3.0 (the 480p setting)."""
TRANSFORMER_SCALES = {
    "tiny": dict(num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=2, rope_max_seq_len=32),
    "small": dict(num_attention_heads=8, attention_head_dim=64, ffn_dim=2048, num_layers=10, rope_max_seq_len=1024),
    "full": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, rope_max_seq_len=1024),
}
"""WanTransformer3DModel sizes by scale (small: ~45M parameters; full: Wan 2.1 T2V 1.3B)."""
SMALL_PARTS = {
    "umt5": dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4),
    "vae": dict(base_dim=3, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
}
PARTS = {
    "tiny": SMALL_PARTS,
    "small": SMALL_PARTS,
    # Wan 2.1's VAE; UMT5-XXL at its real width with two layers.
    "full": {
        "umt5": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64, feed_forward_proj="gated-gelu"),
        "vae": dict(base_dim=96, dim_mult=[1, 2, 4, 4], num_res_blocks=2),
    },
}
"""Text encoder and VAE by scale."""


def denoiser(scale: str):
    """The random-init WanTransformer3DModel of `scale` (on the current default device)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        in_channels=16,
        out_channels=16,
        text_dim=PARTS[scale]["umt5"]["d_model"],
        freq_dim=256,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        **TRANSFORMER_SCALES[scale],
    )


def build(folder: Path, seed: int = 0, scale: str = "tiny") -> Path:
    """Write a random-init Wan 2.1 T2V checkpoint (diffusers layout, model_index.json) to `folder`."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = save_t5_tokenizer(folder / "tokenizer")
    parts = PARTS[scale]
    torch.manual_seed(seed)
    transformer = denoiser(scale)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(z_dim=16, temperal_downsample=[False, True, True], **parts["vae"])
    torch.manual_seed(seed + 2)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            relative_attention_num_buckets=8,
            **parts["umt5"],
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
