"""Wan 2.1 text-to-video: stagediff equals WanPipeline; MP4 output; bad inputs."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline

from helpers import run_all_stages, stored_item
from reference import reference_outputs, reference_pipeline, relative_error
from stagediff import stages
from stagediff.adapters import adapter_for
from stagediff.errors import StagediffError
from stagediff.media import read_mp4_metadata
from stagediff.plan import make_plan
from stagediff.request import Request

SIZE = dict(height=32, width=48, frames=9)
CALL = dict(height=32, width=48, num_frames=9, num_inference_steps=2)


@pytest.fixture(scope="module")
def tiny_wan(tiny_models):
    return tiny_models("wan")


def _request(model, store, **options):
    return Request(**{"model": str(model), "prompts": ["a cat walks"], "seeds": [3], "steps": 2, "store": str(store), **SIZE, **options})


def decoded_frames(request: Request, seed: int) -> np.ndarray:
    """The frames stagediff decodes for an item, before MP4 encoding."""
    plan = make_plan(request)
    latents, _ = stored_item(request, request.prompts[0], seed)
    stages.decode(plan)  # loads the decode pipeline
    pipe = stages._loaded[stages.DECODE].pipe
    return np.concatenate([chunk[0] for chunk in adapter_for(plan.family).decode(pipe, latents, plan.items[0].settings)])


def luma_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of the BT.601 luma. H.264 in yuv420p (what browsers play) keeps luma at full resolution but
    halves chroma, which the random tiny VAE's pixel-level colour noise cannot survive."""
    weights = np.array([0.299, 0.587, 0.114])
    mse = np.mean((a.astype(np.float64) @ weights - b.astype(np.float64) @ weights) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("backend", ["torch", "torchax"])
def test_latents_and_frames_equal_the_wan_pipeline(tiny_wan, tmp_path, backend):
    request = _request(tiny_wan, tmp_path, negative_prompt="static, blurry", guidance=4.0, backend=backend)
    run_all_stages(request)
    expected_latents, expected_frames = reference_outputs(
        WanPipeline, tiny_wan, 3, prompt="a cat walks", negative_prompt="static, blurry", guidance_scale=4.0, **CALL
    )
    latents, _ = stored_item(request, "a cat walks", 3)
    assert latents.shape == (1, 16, 3, 4, 6)
    assert relative_error(latents, expected_latents) < 1e-3
    frames = decoded_frames(request, 3)
    assert frames.shape == (9, 32, 48, 3)
    assert np.abs(frames.astype(int) - expected_frames[0].astype(int)).max() <= 2


def test_mp4_has_the_frames_size_fps_and_metadata(tiny_wan, tmp_path):
    import imageio.v3 as iio

    request = _request(tiny_wan, tmp_path, fps=12)
    run_all_stages(request)
    _, expected_frames = reference_outputs(WanPipeline, tiny_wan, 3, prompt="a cat walks", **CALL)
    item = make_plan(request).items[0]
    data = make_plan(request).store.read_bytes(item.media_path)

    video = iio.imread(data, extension=".mp4")
    assert video.shape == (9, 32, 48, 3)
    assert iio.immeta(data, extension=".mp4")["fps"] == 12
    assert luma_psnr(video, expected_frames[0]) >= 35
    metadata = read_mp4_metadata(data)
    assert (metadata["prompt"], metadata["seed"], metadata["frames"], metadata["fps"]) == ("a cat walks", 3, 9, 12)


def test_flow_shift_option_matches_a_rescheduled_pipeline(tiny_wan, tmp_path):
    request = _request(tiny_wan, tmp_path, extras={"flow_shift": 5.0})
    run_all_stages(request)
    pipe = reference_pipeline(WanPipeline, str(tiny_wan))
    original = pipe.scheduler
    pipe.scheduler = UniPCMultistepScheduler.from_config(original.config, flow_shift=5.0)
    try:
        expected = pipe("a cat walks", generator=torch.Generator().manual_seed(3), output_type="latent", **CALL).frames
    finally:
        pipe.scheduler = original
    latents, _ = stored_item(request, "a cat walks", 3)
    assert relative_error(latents, expected) < 1e-3
    assert make_plan(request).items[0].settings.extras["flow_shift"] == 5.0


def test_one_prompt_three_seeds_encodes_once(tiny_wan, tmp_path):
    results = run_all_stages(_request(tiny_wan, tmp_path, seeds=[0, 1, 2]))
    assert {stage: result.computed for stage, result in results.items()} == {"encode": 1, "denoise": 3, "decode": 3}
    assert len(list(tmp_path.glob("media/*.mp4"))) == 3


def test_auto_batches_equal_one_item_at_a_time(tiny_wan, tmp_path):
    import imageio.v3 as iio

    one = _request(tiny_wan, tmp_path / "one", seeds=[0, 1, 2], batch_size=1)
    auto = _request(tiny_wan, tmp_path / "auto", seeds=[0, 1, 2])
    run_all_stages(one)
    results = run_all_stages(auto)
    assert results["denoise"].batch_sizes == [1, 2] and results["decode"].batch_sizes == [3]
    for seed in (0, 1, 2):
        (latents, _), (expected, _) = stored_item(auto, "a cat walks", seed), stored_item(one, "a cat walks", seed)
        assert relative_error(latents, expected) < 1e-3
        videos = [iio.imread(make_plan(request).store.read_bytes(item.media_path), extension=".mp4")
                  for request in (auto, one) for item in make_plan(request).items if item.seed == seed]
        assert luma_psnr(*videos) >= 35


@pytest.mark.parametrize(
    "options, message",
    [
        ({"frames": 8}, "--frames 8 must be 4n+1"),
        ({"frames": 0}, "--frames 0 must be a positive integer"),
        ({"height": 40}, "--height 40 must be a positive multiple of 16"),
        ({"width": 33}, "--width 33 must be a positive multiple of 16"),
        ({"extras": {"flow_shift": -1.0}}, "--flow-shift -1.0 must be positive"),
    ],
)
def test_bad_video_options_fail_clearly_with_no_artifacts(tiny_wan, tmp_path, options, message):
    with pytest.raises(StagediffError, match=re.escape(message)):
        make_plan(_request(tiny_wan, tmp_path / "store", **options))
    assert not (tmp_path / "store").exists()
