"""What every FLUX adapter shares: a decode that turns stored latents into the VAE's input as the
pipeline does after its loop, then `vae.decode`."""

from __future__ import annotations

from abc import abstractmethod

import torch

from stagediff.adapters.base import Adapter, decode_images
from stagediff.families import Settings


class FluxAdapter(Adapter):
    @abstractmethod
    def latents_for_vae(self, pipe, latents: torch.Tensor, settings: Settings) -> torch.Tensor:
        """Stored latents (as `output_type="latent"` returns them) → the VAE decoder's input, as the
        pipeline computes it after its denoise loop."""

    def decode(self, pipe, latents, settings):
        vae = pipe.vae
        latents = self.latents_for_vae(pipe, latents, settings).to(vae.device, vae.dtype)
        yield decode_images(vae, latents)
