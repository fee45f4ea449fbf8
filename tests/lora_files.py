"""Tiny LoRAs for the tiny models, built with peft as trainers build them and saved as users get them:
diffusers' format (with peft's adapter config in the file's metadata) or kohya's."""

from __future__ import annotations

from pathlib import Path

import torch

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
CLIP_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]


def trained_lora(module: torch.nn.Module, targets: list[str], seed: int, rank: int = 4, alpha: int = 8):
    """(peft state dict, adapter metadata) of a LoRA on `targets` of `module` with random, non-zero A and B
    (as after training); `module` itself is left unchanged."""
    import copy

    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(seed)
    adapted = inject_adapter_in_model(config, copy.deepcopy(module), adapter_name="trained")
    weights = get_peft_model_state_dict(adapted, adapter_name="trained")
    metadata = {key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}
    return {name: tensor.detach().clone() for name, tensor in weights.items()}, metadata


def sdxl_lora(model: Path, folder: Path, text_encoder: bool = True) -> Path:
    """An SDXL LoRA in diffusers' format: UNet attention, and CLIP-L attention when `text_encoder`."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet, unet_metadata = trained_lora(UNet2DConditionModel.from_pretrained(model / "unet"), ATTENTION, seed=1)
    parts = {"unet_lora_layers": unet, "unet_lora_adapter_metadata": unet_metadata}
    if text_encoder:
        clip, clip_metadata = trained_lora(CLIPTextModel.from_pretrained(model / "text_encoder"), CLIP_ATTENTION, seed=2)
        parts.update(text_encoder_lora_layers=clip, text_encoder_lora_adapter_metadata=clip_metadata)
    StableDiffusionXLPipeline.save_lora_weights(folder, weight_name="lora.safetensors", **parts)
    return folder / "lora.safetensors"


def sdxl_kohya_lora(model: Path, path: Path) -> Path:
    """An SDXL LoRA as kohya's scripts save it: `lora_unet_*` / `lora_te1_text_model_*` names, `lora_down`,
    `lora_up` and `alpha` tensors (converted by diffusers' own `convert_state_dict_to_kohya`)."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    unet, _ = trained_lora(UNet2DConditionModel.from_pretrained(model / "unet"), ATTENTION, seed=3, alpha=4)
    clip, _ = trained_lora(CLIPTextModel.from_pretrained(model / "text_encoder"), CLIP_ATTENTION, seed=4, alpha=4)
    named = {**{f"unet.{k}": v for k, v in unet.items()}, **{f"text_encoder.text_model.{k}": v for k, v in clip.items()}}
    save_file({k: v.contiguous() for k, v in convert_state_dict_to_kohya(named).items()}, path)
    return path


def flux_lora(model: Path, folder: Path) -> Path:
    """A FLUX.1 transformer LoRA in diffusers' format (a denoiser-only LoRA)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    transformer, metadata = trained_lora(FluxTransformer2DModel.from_pretrained(model / "transformer"), ATTENTION, seed=5)
    FluxPipeline.save_lora_weights(folder, weight_name="lora.safetensors", transformer_lora_layers=transformer,
                                   transformer_lora_adapter_metadata=metadata)
    return folder / "lora.safetensors"
