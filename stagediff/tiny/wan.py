"""Tiny random-init Wan 2.1 text-to-video: the real WanPipeline classes (UMT5, WanTransformer3DModel,
AutoencoderKLWan, UniPC flow-matching scheduler) with small configs."""

from __future__ import annotations

from pathlib import Path

import torch

from stagediff.tiny.tokenizers import save_t5_tokenizer, t5_config_ids

FLOW_SHIFT = 3.0
"""Wan 2.1 checkpoints ship flow_shift 3.0 (the 480p setting)."""
TRANSFORMER_SCALES = {
    "tiny": dict(num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=2, rope_max_seq_len=32),
    "small": dict(num_attention_heads=8, attention_head_dim=64, ffn_dim=2048, num_layers=10, rope_max_seq_len=1024),
    "full": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, rope_max_seq_len=1024),
}
"""WanTransformer3DModel sizes by scale (small: ~45M parameters; full: Wan 2.1 T2V 1.3B)."""
WAN_14B = dict(num_attention_heads=40, ffn_dim=13824, num_layers=40)
"""Wan 2.1 T2V 14B's transformer where it differs from 1.3B's."""
SMALL_PARTS = {
    "umt5": dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4),
    "vae": dict(base_dim=3, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
}
PARTS = {
    "tiny": SMALL_PARTS,
    "small": SMALL_PARTS,
    # Wan 2.1's VAE and UMT5-XXL text encoder (its real vocabulary size; the small offline tokenizer's
    # ids stay inside it).
    "full": {
        "umt5": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
                     vocab_size=256384, relative_attention_num_buckets=32),
        "vae": dict(base_dim=96, dim_mult=[1, 2, 4, 4], num_res_blocks=2),
    },
}
"""Text encoder and VAE by scale."""


def denoiser(scale: str, **changes):
    """The random-init WanTransformer3DModel of `scale` (on the current default device), its config
    changed by `changes` (`WAN_14B`: the 14B model)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        in_channels=16,
        out_channels=16,
        text_dim=PARTS[scale]["umt5"]["d_model"],
        freq_dim=256,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        **{**TRANSFORMER_SCALES[scale], **changes},
    )


def autoencoder(scale: str):
    """The random-init AutoencoderKLWan of `scale` (on the current default device; `full`: Wan 2.1's VAE)."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(z_dim=16, temperal_downsample=[False, True, True], **PARTS[scale]["vae"])


def text_encoders(scale: str, tokenizer, seed: int = 0) -> tuple:
    """The random-init UMT5 text encoder of `scale` (on the current default device), as a 1-tuple."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed + 2)
    config = UMT5Config(**{**t5_config_ids(tokenizer), "relative_attention_num_buckets": 8, **PARTS[scale]["umt5"]})
    return (UMT5EncoderModel(config),)


def build(folder: Path, seed: int = 0, scale: str = "tiny") -> Path:
    """Write a random-init Wan 2.1 T2V checkpoint (diffusers layout, model_index.json) to `folder`."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = save_t5_tokenizer(folder / "tokenizer")
    torch.manual_seed(seed)
    transformer = denoiser(scale)
    torch.manual_seed(seed + 1)
    vae = autoencoder(scale)
    (text_encoder,) = text_encoders(scale, tokenizer, seed)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=FLOW_SHIFT, num_train_timesteps=1000
    )
    pipeline = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )
    pipeline.save_pretrained(folder)
    return folder
