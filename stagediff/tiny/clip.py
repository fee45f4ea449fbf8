"""Tiny random-init CLIP scorer: transformers' real CLIPModel from a small CLIPConfig, the offline CLIP
tokenizer and a CLIPImageProcessor, in the layout of a Hub CLIP checkpoint (one folder)."""

from __future__ import annotations

from pathlib import Path

import torch

from stagediff.tiny.tokenizers import clip_config_ids, save_clip_tokenizer

SCALES = {
    "tiny": {"hidden": 32, "layers": 2, "heads": 4, "intermediate": 37, "image": 32, "patch": 8, "projection": 16},
    # Enough compute to time scoring against decoding on a CPU (still far below ViT-L/14's 428M parameters).
    "small": {"hidden": 256, "layers": 6, "heads": 4, "intermediate": 1024, "image": 224, "patch": 32,
              "projection": 256},
    # The architecture of openai/clip-vit-large-patch14.
    "full": {"hidden": 768, "layers": 12, "heads": 12, "intermediate": 3072, "image": 224, "patch": 14,
             "projection": 768, "vision_hidden": 1024, "vision_layers": 24, "vision_heads": 16,
             "vision_intermediate": 4096},
}


def build(folder: Path, scale: str = "tiny") -> Path:
    """Write a random-init CLIP model of `scale` (weights as safetensors, tokenizer, image processor) to
    `folder` and return it."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    dims = SCALES[scale]
    folder = Path(folder)
    text = {"hidden_size": dims["hidden"], "num_hidden_layers": dims["layers"], "num_attention_heads": dims["heads"],
            "intermediate_size": dims["intermediate"], "max_position_embeddings": 77, **clip_config_ids()}
    vision = {"hidden_size": dims.get("vision_hidden", dims["hidden"]),
              "num_hidden_layers": dims.get("vision_layers", dims["layers"]),
              "num_attention_heads": dims.get("vision_heads", dims["heads"]),
              "intermediate_size": dims.get("vision_intermediate", dims["intermediate"]),
              "image_size": dims["image"], "patch_size": dims["patch"]}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=dims["projection"])
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    save_clip_tokenizer(folder)
    size = dims["image"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(folder)
    return folder
