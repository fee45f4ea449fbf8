"""The decode stage's VAE on its backend, and the tiles it decodes in.

With torchax the VAE's decoder network is compiled (once per input shape, like the denoiser) and
everything around it runs as diffusers wrote it: the family adapter's latent de-normalisation, the
VAE's own `decode` with its tiling and blending, AutoencoderKLWan's frame loop. The Wan decoder carries
a feature cache from one latent frame to the next; its stand-in makes that cache an input and an output
of the compiled program and keeps it on the device, so every latent frame after the second reuses one
program (compiling the whole decode instead is measured in benchmarks section 9).

Tiling (diffusers' own `enable_tiling`) is used when `--vae-tiling` asks for it, or when decoding in
one piece would need more activation memory than the device has free.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass

import torch

from stagediff.backends import device_mesh, place_pipeline

MIN_TILE = 64
"""The smallest tile (pixels) the automatic choice goes down to."""
MEMORY_MARGIN = 0.9
"""The share of the device's free memory a decode plans to use."""
PEAK_ACTIVATIONS = 4
"""A decode's peak memory, in units of its largest activation: a resnet block holds its input, the
normalised input and the convolution outputs at once (checked against measured peaks in benchmarks)."""


# -- placement ----------------------------------------------------------------------------------
class CausalStep(torch.nn.Module):
    """AutoencoderKLWan's decoder as a pure function: `(latent frame, feature cache, first cache slot)`
    → `(frames, new feature cache, next cache slot)`, where the decoder itself updates the cache list
    in place."""

    def __init__(self, decoder: torch.nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, x, cache, first_slot, first_chunk=False):
        cache = list(cache)
        slot = [first_slot]
        frames = self.decoder(x, feat_cache=cache, feat_idx=slot, first_chunk=first_chunk)
        return frames, cache, slot[0]


class CompiledCausalDecoder:
    """Stands in for AutoencoderKLWan's decoder, called as the VAE calls it (`feat_cache` and `feat_idx`
    lists updated in place): the cache entries it writes are device arrays, which the next call passes
    straight back to the compiled step."""

    def __init__(self, decoder: torch.nn.Module, **compile_options):
        from tpu_ops.compiled_module import CompiledModule

        self.step = CompiledModule(CausalStep(decoder), **compile_options)

    def __getattr__(self, name):
        return getattr(self.__dict__["step"].module.decoder, name)

    def __call__(self, x, feat_cache, feat_idx, first_chunk=False):
        from tpu_ops.host import to_torch

        frames, cache, next_slot = self.step.call_on_device(x, feat_cache, feat_idx[0], first_chunk=first_chunk)
        feat_cache[:] = cache
        feat_idx[0] = next_slot
        return to_torch(frames)


def _compiled_decoder(decoder, **options):
    from tpu_ops.compiled_module import CompiledModule

    return CompiledModule(decoder, **options)


DECODER_STAND_INS: dict[str, Callable] = {"AutoencoderKLWan": CompiledCausalDecoder}
"""How a VAE class's decoder network is compiled; others: a CompiledModule of the decoder."""


def place_decoder(pipe, backend: str, vae_dtype: torch.dtype, on_compile=None, mesh: str | None = None):
    """Put the decode stage's VAE in `vae_dtype` on its backend: with torchax, its decoder network
    compiled; on `mesh` its weights replicated, the items of a batch over `dp` and their rows over the
    other axes."""
    pipe.vae.to(vae_dtype)
    if backend == "torch":
        return place_pipeline(pipe, backend, None, mesh=mesh)
    from tpu_ops.compiled_module import image_input_spec

    vae = pipe.vae
    stand_in = DECODER_STAND_INS.get(type(vae).__name__, _compiled_decoder)
    compiled = stand_in(vae.decoder, on_compile=on_compile, mesh=device_mesh(mesh), input_layout=image_input_spec)
    # nn.Module would refuse a non-Module child; the VAE only calls its decoder.
    object.__setattr__(vae, "decoder", compiled)
    return pipe


# -- tiling -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TilingRule:
    """How one VAE class tiles: its default tile (pixels) and how to set a tile size (None: off)."""

    default_tile: Callable[[object], int]
    apply: Callable[[object, int | None], None]


def _square(size) -> int:
    return size[0] if isinstance(size, (list, tuple)) else size


def _apply_kl(vae, tile: int | None) -> None:
    if tile is None:
        vae.disable_tiling()
        return
    vae.enable_tiling()
    vae.tile_sample_min_size = tile
    vae.tile_latent_min_size = tile // vae_factor(vae)


def _apply_wan(vae, tile: int | None) -> None:
    if tile is None:
        vae.disable_tiling()
        return
    # diffusers' default overlap: a stride of three quarters of the tile (192 of 256).
    stride = tile * 3 // 4
    vae.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile, tile_sample_stride_height=stride,
                      tile_sample_stride_width=stride)


WAN_DEFAULT_TILE = 256
"""AutoencoderKLWan's default `tile_sample_min_height/width`."""
TILING: dict[str, TilingRule] = {
    "AutoencoderKL": TilingRule(lambda vae: _square(vae.config.sample_size), _apply_kl),
    "AutoencoderKLFlux2": TilingRule(lambda vae: _square(vae.config.sample_size), _apply_kl),
    "AutoencoderKLWan": TilingRule(lambda vae: WAN_DEFAULT_TILE, _apply_wan),
}
"""Tiling per VAE class, through diffusers' public tiling settings."""


def vae_factor(vae) -> int:
    """Pixels per latent pixel."""
    if hasattr(vae.config, "scale_factor_spatial"):
        return vae.config.scale_factor_spatial
    return 2 ** (len(vae.config.block_out_channels) - 1)


def vae_input_shape(vae, batch: int, settings) -> tuple[int, ...]:
    """The shape of the latents the VAE decodes for a batch: `[B, C, (latent frames,) H/f, W/f]`."""
    factor = vae_factor(vae)
    channels = vae.config.get("latent_channels") or vae.config.z_dim
    spatial = (settings.height // factor, settings.width // factor)
    if settings.frames is None:
        return (batch, channels, *spatial)
    return (batch, channels, (settings.frames - 1) // vae.config.scale_factor_temporal + 1, *spatial)


def decode_bytes(vae, latents_shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Estimated peak activation memory of decoding latents of `latents_shape` in one piece: the
    largest activation of the VAE's decode (traced on the meta device, no memory used) times
    `PEAK_ACTIVATIONS`. A causal video VAE decodes one latent frame at a time, so three latent
    frames (the first, the second and a steady-state one) stand for any number."""
    shape = list(latents_shape)
    if len(shape) == 5:
        shape[2] = min(shape[2], 3)
    config = json.dumps(dict(vae.config), sort_keys=True, default=str)
    largest = _largest_activation(type(vae), config, tuple(shape))
    return PEAK_ACTIVATIONS * largest * torch.empty((), dtype=dtype).element_size()


@functools.lru_cache(maxsize=64)
def _largest_activation(vae_class: type, config_json: str, shape: tuple[int, ...]) -> int:
    """Elements of the largest tensor a module of an (untiled) VAE returns while decoding latents of
    `shape`, its weights on the meta device (shapes only)."""
    with torch.device("meta"):
        twin = vae_class.from_config(json.loads(config_json)).eval()
    largest = 0

    def record(module, inputs, output):
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel())

    for module in twin.modules():
        module.register_forward_hook(record)
    with torch.no_grad():
        twin.decode(torch.empty(shape, device="meta"))
    return largest


def choose_tile(vae, latents_shape: tuple[int, ...], forced: bool, free_bytes: int | None) -> int | None:
    """The tile size (pixels) to decode these latents in, or None for one piece: one piece unless
    `forced` or it would not fit `free_bytes` (None: unknown, assume it fits); then the VAE's default
    tile, halved while a tile's decode (plus the decoded image, which tiles are blended into) would
    not fit."""
    budget = None if free_bytes is None else free_bytes * MEMORY_MARGIN
    if not forced and (budget is None or decode_bytes(vae, latents_shape, vae.dtype) <= budget):
        return None
    rule = TILING.get(type(vae).__name__)
    if rule is None:
        return None
    factor = vae_factor(vae)
    output_bytes = 2 * latents_shape[0] * 3 * latents_shape[-2] * latents_shape[-1] * factor**2 * 4
    if len(latents_shape) == 5:
        output_bytes *= 1 + (latents_shape[2] - 1) * 4
    tile = rule.default_tile(vae)
    while budget is not None and tile > MIN_TILE:
        tile_shape = (*latents_shape[:-2], tile // factor, tile // factor)
        if decode_bytes(vae, tile_shape, vae.dtype) + output_bytes <= budget:
            break
        tile //= 2
    return tile


def set_tiling(vae, tile: int | None) -> None:
    """Decode in tiles of `tile` pixels from now on (None: in one piece)."""
    rule = TILING.get(type(vae).__name__)
    if rule is not None:
        rule.apply(vae, tile)


def tiles_used(vae, latents_shape: tuple[int, ...], tile: int | None) -> int | None:
    """`tile` if the VAE will actually tile latents of this shape (diffusers decodes latents no
    larger than one tile in one piece), else None."""
    if tile is None:
        return None
    latent_tile = tile // vae_factor(vae)
    return tile if max(latents_shape[-2:]) > latent_tile else None
