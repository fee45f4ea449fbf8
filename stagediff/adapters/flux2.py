"""FLUX.2's numerics (dev and klein): stacked hidden states of fixed text-encoder layers as the prompt
embedding, and each pipeline's own latent layout turned into the VAE's input."""

from __future__ import annotations

from pathlib import Path

import torch

from stagediff.adapters.flux import FluxAdapter
from stagediff.families.flux import MAX_SEQUENCE_LENGTH
from stagediff.families.flux2 import Flux2, Flux2Klein


class Flux2FamilyAdapter(FluxAdapter):
    def encode_text(self, pipe, text: str) -> torch.Tensor:
        embeds, _text_ids = pipe.encode_prompt(
            prompt=text,
            device=torch.device("cpu"),
            num_images_per_prompt=1,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            text_encoder_out_layers=self.family.text_encoder_out_layers,
        )
        return embeds


class Flux2Adapter(Flux2FamilyAdapter):
    family = Flux2()

    def own_components(self, folder, names):
        if "tokenizer" not in names:
            return {}
        return {"tokenizer": load_chat_tokenizer(Path(folder) / "tokenizer")}

    def encode(self, pipe, prompt, negative_prompt, settings):
        return {"prompt_embeds": self.encode_text(pipe, prompt)}

    def latents_for_vae(self, pipe, latents, settings):
        batch, tokens, channels = latents.shape
        height = settings.height // (2 * pipe.vae_scale_factor)
        width = settings.width // (2 * pipe.vae_scale_factor)
        # The pipeline scatters tokens by their position ids, which enumerate rows then columns:
        # the inverse of its packing.
        latents = latents.permute(0, 2, 1).reshape(batch, channels, height, width)
        bn, eps = pipe.vae.bn, pipe.vae.config.batch_norm_eps
        mean = bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + eps).to(latents.device, latents.dtype)
        return pipe._unpatchify_latents(latents * std + mean)


class Flux2KleinAdapter(Flux2FamilyAdapter):
    family = Flux2Klein()

    def encode(self, pipe, prompt, negative_prompt, settings):
        tensors = {"prompt_embeds": self.encode_text(pipe, prompt)}
        if not settings.extras["distilled"]:
            # The pipeline's own negative prompt is the empty string.
            tensors["negative_prompt_embeds"] = self.encode_text(pipe, negative_prompt or "")
        return tensors

    def latents_for_vae(self, pipe, latents, settings):
        return latents


def load_chat_tokenizer(folder: Path):
    """The tokenizer in `folder`, with the chat template of the processor saved there if any.

    FLUX.2-dev's tokenizer folder holds a PixtralProcessor, which transformers refuses to build
    without torchvision (for its image processor). For text the pipeline only calls
    `apply_chat_template`, which renders the processor's template and tokenizes the result with
    the processor's tokenizer; the tokenizer with that same template does exactly this (Mistral's
    template starts with the BOS token, so neither path adds special tokens of its own).
    """
    from transformers import AutoTokenizer
    from transformers.processing_utils import ProcessorMixin

    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor_dict, _ = ProcessorMixin.get_processor_dict(str(folder))
    if processor_dict.get("chat_template") is not None:
        tokenizer.chat_template = processor_dict["chat_template"]
    return tokenizer
