"""The decode stage on the torchax backend: equal to torch decode for every family, compiled once per
shape, items of a call over a dp mesh, tiled (blend checked) when asked or when memory needs it."""

from __future__ import annotations

import io
import shutil

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import run_all_stages
from stagediff import stages
from stagediff.decoding import choose_tile, decode_bytes, tiles_used
from stagediff.media import read_png_metadata
from stagediff.plan import make_plan
from stagediff.request import Request
from test_wan import luma_psnr

SIZES = {
    "sdxl": dict(height=64, width=64),
    "flux1": dict(height=32, width=48),
    "flux2": dict(height=32, width=48),
    "flux2-klein": dict(height=32, width=48),
    "wan": dict(height=32, width=32, frames=13),
}


MESHES = {"sdxl": dict(mesh="tp=8", batch_size=1), "wan": dict(mesh="dp=2,tp=4", batch_size=2)}


def media_pixels(plan, item) -> np.ndarray:
    """uint8 frames `[f, H, W, 3]` of an item's media file."""
    data = plan.store.read_bytes(item.media_path)
    if item.media_path.endswith(".png"):
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[None]
    return iio.imread(data, extension=".mp4")


def latents_only(source, destination) -> None:
    """A copy of a store without its media: the next decode starts from the same latents."""
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns("media"))


def decode_with(request: Request, **changes) -> tuple:
    """Decode a request's latents with changed options; (plan, decode result)."""
    plan = make_plan(Request(**{**request.to_dict(), **changes}))
    return plan, stages.decode(plan)


def assert_same_media(plan_a, plan_b) -> None:
    """PNGs within 2/255; videos with the same frame count and luma PSNR ≥ 35 dB (H.264 is lossy)."""
    for item_a, item_b in zip(plan_a.items, plan_b.items):
        a, b = media_pixels(plan_a, item_a), media_pixels(plan_b, item_b)
        assert a.shape == b.shape
        if item_a.media_path.endswith(".png"):
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
        else:
            assert a.shape[0] == plan_a.items[0].settings.frames
            assert luma_psnr(a, b) >= 35


@pytest.mark.parametrize("family", SIZES)
def test_torchax_decode_equals_torch_decode_and_compiles_once_per_shape(eight_devices, tiny_models, tmp_path, family):
    """Two items decoded with torchax equal torch's; a second call compiles nothing; one image program,
    three for Wan's causal decoder (first frame, second, and every later one: 13 frames are 4 latent
    frames). On 8 devices, equal to one: SDXL one item at a time, its rows split 8 ways (`tp=8`); Wan
    both items in one call, one per half (`dp=2`), their rows split 4 ways (`tp=4`)."""
    torch_request = Request(model=str(tiny_models(family)), prompts=["a cat"], seeds=[0, 1], steps=1,
                            store=str(tmp_path / "torch"), backend="torch", **SIZES[family])
    run_all_stages(torch_request)
    programs = 3 if family == "wan" else 1
    latents_only(tmp_path / "torch", tmp_path / "torchax")
    plan, decoded = decode_with(torch_request, store=str(tmp_path / "torchax"), backend="torchax")
    assert_same_media(make_plan(torch_request), plan)
    assert decoded.compiles == programs
    for item in plan.items:
        plan.store.remove(item.media_path)
    again = stages.decode(plan)
    assert (again.computed, again.compiles) == (2, 0)

    if family in MESHES:
        latents_only(tmp_path / "torch", tmp_path / "mesh")
        meshed, result = decode_with(torch_request, store=str(tmp_path / "mesh"), backend="torchax", **MESHES[family])
        assert (result.computed, result.compiles) == (2, programs)
        assert_same_media(plan, meshed)
    stages.release()


TILE = 128
"""The tiny SDXL VAE's default tile (its `sample_size`), in pixels: 16 latent pixels."""


def test_tiled_decode_blends_tiles_as_diffusers_does(tiny_sdxl, tmp_path):
    """256² with 128-pixel tiles that overlap by a quarter: 3 × 3 tiles. Away from the seams each tile
    equals its own latents decoded alone; across a seam the image blends the two tiles linearly; the
    whole equals diffusers' own tiled decode. (GroupNorm and attention see only their tile, so tiles
    differ from the untiled image of a random-weight VAE everywhere, not only at seams.)"""
    from diffusers import AutoencoderKL

    request = Request(model=str(tiny_sdxl), prompts=["a cat"], seeds=[0], steps=1, height=256, width=256,
                      store=str(tmp_path), backend="torch", vae_tiling=True)
    stages.encode(make_plan(request))
    stages.denoise(make_plan(request))
    plan, decoded = decode_with(request, backend="torchax")
    assert decoded.compiles == 4  # full tiles, and the smaller ones along the right and bottom edges
    item = plan.items[0]
    assert read_png_metadata(plan.store.read_bytes(item.media_path))["vae_tile"] == TILE
    image = media_pixels(plan, item)[0].astype(int)

    reference = AutoencoderKL.from_pretrained(tiny_sdxl / "vae")
    latents = plan.store.read_tensors(item.latents_path, item.latents_key)["latents"] / reference.config.scaling_factor
    latent_tile, stride = TILE // 8, int(TILE // 8 * 0.75)
    assert len(range(0, latents.shape[-1], stride)) ** 2 >= 4

    def pixels(decoded):
        return ((decoded / 2 + 0.5).clamp(0, 1) * 255).round().numpy().astype(int)

    with torch.no_grad():  # decoded images `[H, W, 3]`, before clamping (tiles blend unclamped)
        left = reference.decode(latents[..., :latent_tile, :latent_tile]).sample[0].permute(1, 2, 0)
        right = reference.decode(latents[..., :latent_tile, stride : stride + latent_tile]).sample[0].permute(1, 2, 0)
        reference.enable_tiling()
        tiled = reference.decode(latents).sample[0].permute(1, 2, 0)
    blend = TILE // 4
    kept = TILE - blend
    weights = (torch.arange(blend) / blend)[None, :, None]
    seam = left[:kept, kept:TILE] * (1 - weights) + right[:kept, :blend] * weights
    assert np.abs(image[:kept, :kept] - pixels(left[:kept, :kept])).max() <= 2
    assert np.abs(image[:kept, kept : kept + blend] - pixels(seam)).max() <= 2
    assert np.abs(image[:kept, kept + blend : 2 * kept] - pixels(right[:kept, blend:kept])).max() <= 2
    assert np.abs(image - pixels(tiled)).max() <= 2
    stages.release()


def test_vae_tiling_is_part_of_the_media_key_and_one_tile_decodes_whole(tiny_sdxl, tmp_path):
    base = dict(model=str(tiny_sdxl), prompts=["a cat"], seeds=[0], steps=1, store=str(tmp_path))
    plain, tiled = make_plan(Request(**base)), make_plan(Request(**base, vae_tiling=True))
    assert plain.items[0].latents_key == tiled.items[0].latents_key
    assert plain.items[0].media_key != tiled.items[0].media_key
    vae_shape = (1, 4, 8, 8)  # 64², smaller than one 128-pixel tile
    assert tiles_used(_tiny_vae(tiny_sdxl), vae_shape, TILE) is None


def _tiny_vae(folder):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder / "vae")


def test_tiles_are_chosen_from_the_memory_estimate(tiny_sdxl):
    vae = _tiny_vae(tiny_sdxl)
    whole = (1, 4, 64, 64)  # 512²
    needed = decode_bytes(vae, whole, torch.float32)
    assert decode_bytes(vae, (1, 4, 128, 128), torch.float32) == 4 * needed  # activations grow with the pixels
    assert decode_bytes(vae, (1, 4, 64, 64), torch.bfloat16) == needed // 2
    assert choose_tile(vae, whole, forced=False, free_bytes=2 * needed) is None
    assert choose_tile(vae, whole, forced=True, free_bytes=2 * needed) == TILE  # diffusers' tile: the VAE's sample_size
    assert choose_tile(vae, whole, forced=False, free_bytes=needed // 2) == TILE
    # So little memory that a 128-pixel tile does not fit either: the tile halves.
    assert choose_tile(vae, whole, forced=False, free_bytes=needed // 12) == TILE // 2
