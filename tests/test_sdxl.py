"""SDXL end to end: stagediff equals StableDiffusionXLPipeline, on both backends."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers import StableDiffusionXLPipeline

from reference import reference_outputs, relative_error
from helpers import run_all_stages, stored_item
from stagediff import stages
from stagediff.plan import make_plan
from stagediff.request import Request

SETTINGS = dict(num_inference_steps=3, guidance_scale=6.0, height=64, width=96)


@pytest.mark.parametrize("backend", ["torch", "torchax"])
def test_latents_and_pixels_equal_the_diffusers_pipeline(tiny_sdxl, tmp_path, backend):
    request = Request(
        model=str(tiny_sdxl), prompts=["a red cat", "a blue dog"], seeds=[3, 7], negative_prompt="blurry",
        steps=3, guidance=6.0, height=64, width=96, store=str(tmp_path), backend=backend,
    )
    run_all_stages(request)
    for prompt in request.prompts:
        for seed in request.seeds:
            expected_latents, expected_pixels = reference_outputs(
                StableDiffusionXLPipeline, tiny_sdxl, seed, prompt=prompt, negative_prompt="blurry", **SETTINGS
            )
            latents, pixels = stored_item(request, prompt, seed)
            assert latents.shape == (1, 4, 8, 12)
            assert relative_error(latents, expected_latents) < 1e-3
            assert np.abs(pixels.astype(int) - expected_pixels[0].astype(int)).max() <= 2


def test_without_negative_prompt_matches_the_pipeline_default(tiny_sdxl, tmp_path):
    request = Request(model=str(tiny_sdxl), prompts=["a red cat"], seeds=[1], steps=2, store=str(tmp_path))
    run_all_stages(request)
    expected, _ = reference_outputs(StableDiffusionXLPipeline, tiny_sdxl, 1, prompt="a red cat", num_inference_steps=2)
    latents, _ = stored_item(request, "a red cat", 1)
    assert relative_error(latents, expected) < 1e-3


def test_batched_denoise_equals_one_item_at_a_time(tiny_sdxl, tmp_path):
    one = Request(model=str(tiny_sdxl), prompts=["a red cat"], seeds=[0, 1, 2], steps=2, store=str(tmp_path / "a"),
                  batch_size=1)
    batched = Request(**{**one.to_dict(), "store": str(tmp_path / "b"), "batch_size": 3})
    run_all_stages(one)
    run_all_stages(batched)
    for seed in one.seeds:
        assert relative_error(stored_item(batched, "a red cat", seed)[0], stored_item(one, "a red cat", seed)[0]) < 1e-4


def test_auto_batches_equal_one_item_at_a_time(tiny_sdxl, tmp_path):
    one = Request(model=str(tiny_sdxl), prompts=["a red cat", "a blue dog"], seeds=[0, 1, 2], steps=2,
                  store=str(tmp_path / "a"), batch_size=1)
    auto = Request(**{**one.to_dict(), "store": str(tmp_path / "b"), "batch_size": "auto"})
    run_all_stages(one)
    results = run_all_stages(auto)
    assert results["denoise"].batch_sizes == [1, 5] and results["decode"].batch_sizes == [6]
    for prompt in ("a red cat", "a blue dog"):
        for seed in one.seeds:
            (latents, pixels), (expected_latents, expected_pixels) = stored_item(auto, prompt, seed), stored_item(one, prompt, seed)
            assert relative_error(latents, expected_latents) < 1e-3
            assert np.abs(pixels.astype(int) - expected_pixels.astype(int)).max() <= 2


def test_torchax_compiles_once_per_shape(tiny_sdxl, tmp_path):
    request = Request(
        model=str(tiny_sdxl), prompts=["a red cat", "a blue dog"], seeds=[0, 1], steps=2, store=str(tmp_path), backend="torchax",
        batch_size=1,
    )
    plan = make_plan(request)
    stages.encode(plan)
    first = stages.denoise(plan)
    more = make_plan(Request(**{**request.to_dict(), "seeds": [5, 6]}))
    second = stages.denoise(more)
    assert (first.computed, first.compiles) == (4, 1)
    assert (second.computed, second.compiles) == (4, 0)


STAGE_COMPONENTS = {
    stages.encode: ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
    stages.denoise: ("scheduler", "unet"),
    stages.decode: ("vae",),
}


def test_each_stage_loads_only_its_own_components(tiny_sdxl, tmp_path):
    plan = make_plan(Request(model=str(tiny_sdxl), prompts=["a red cat"], seeds=[0], steps=2, store=str(tmp_path)))
    stages.release()
    for run, expected in STAGE_COMPONENTS.items():
        result = run(plan)
        assert stages.loaded_components(result.stage) == expected
        stages.release(result.stage)
