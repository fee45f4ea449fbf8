"""Step caching (`--cache`): a cache that never skips changes nothing; one that skips runs fewer blocks and
equals diffusers' own pipeline with the same hook config, on both backends; MagCache calibration; keys,
manifest and metadata; bad settings fail in one line with no artifacts."""

from __future__ import annotations

import collections
import functools
import io
import json
import shutil
from contextlib import redirect_stdout
from dataclasses import dataclass

import pytest
import torch
from diffusers import (
    FirstBlockCacheConfig,
    Flux2KleinPipeline,
    Flux2Pipeline,
    FluxPipeline,
    MagCacheConfig,
    TaylorSeerCacheConfig,
    WanPipeline,
)
from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

from helpers import one_line_error, run_all_stages
from reference import reference_pipeline, relative_error
from stagediff import stages
from stagediff.cache_spec import shipped_ratios_source
from stagediff.cli import main
from stagediff.manifest import manifest_of
from stagediff.media import read_png_metadata
from stagediff.plan import make_plan
from stagediff.request import Request

STEPS = 4
SEED = 3


@dataclass(frozen=True)
class Family:
    pipeline: type
    prompt: str
    size: dict
    tail_probe: str
    """A module inside the last transformer block that runs only when that block computes."""

    @property
    def call(self) -> dict:
        size = dict(self.size)
        if "frames" in size:
            size["num_frames"] = size.pop("frames")
        return {"prompt": self.prompt, "num_inference_steps": STEPS, **size}


FAMILIES = {
    "flux1": Family(FluxPipeline, "a red cat", dict(height=32, width=48), "single_transformer_blocks.0.attn.norm_q"),
    "flux2": Family(Flux2Pipeline, "a red cat", dict(height=32, width=48), "single_transformer_blocks.0.attn.norm_q"),
    "flux2-klein": Family(Flux2KleinPipeline, "a red cat", dict(height=32, width=48),
                          "single_transformer_blocks.0.attn.norm_q"),
    "wan": Family(WanPipeline, "a cat walks", dict(height=32, width=48, frames=9), "blocks.1.attn1.norm_q"),
}
# The same caches as `--cache` text and as diffusers configs, built here independently of stagediff.
NEVER_SKIPPING = {
    "fbcache": ("fbcache:0", lambda ratios: FirstBlockCacheConfig(threshold=0.0)),
    # A ratio of exactly 1 says nothing changes, which a threshold of 0 still skips: the calibrated
    # ratios of the tiny models have none after the first step (FLUX.1's shipped ones have).
    "magcache": ("magcache:0", lambda ratios: MagCacheConfig(threshold=0.0, num_inference_steps=STEPS,
                                                             mag_ratios=ratios)),
    "taylorseer": (f"taylorseer:warmup={STEPS}", lambda ratios: TaylorSeerCacheConfig(
        disable_cache_before_step=STEPS, use_lite_mode=True, taylor_factors_dtype=torch.float32)),
    "taylorseer-attention": (f"taylorseer-attention:warmup={STEPS}", lambda ratios: TaylorSeerCacheConfig(
        disable_cache_before_step=STEPS, taylor_factors_dtype=torch.float32)),
}
SKIPPING = {
    "fbcache": ("fbcache:100", lambda ratios: FirstBlockCacheConfig(threshold=100.0)),
    "magcache": ("magcache:100", lambda ratios: MagCacheConfig(threshold=100.0, num_inference_steps=STEPS,
                                                               mag_ratios=ratios)),
    "taylorseer": ("taylorseer:2,warmup=2", lambda ratios: TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=2, use_lite_mode=True, taylor_factors_dtype=torch.float32)),
    "taylorseer-attention": ("taylorseer-attention:interval=2,warmup=2", lambda ratios: TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=2, taylor_factors_dtype=torch.float32)),
}
# Every family with every method it runs, each method on both backends (TaylorSeer's attention caching on
# torch only: torchax compiles whole blocks), without running every combination twice.
SKIPPING_CASES = [
    ("flux1", "fbcache", "torch"), ("flux1", "magcache", "torch"), ("flux1", "taylorseer-attention", "torch"),
    ("flux2", "taylorseer", "torch"), ("flux2-klein", "magcache", "torch"), ("flux2-klein", "taylorseer-attention", "torch"),
    ("wan", "fbcache", "torch"), ("wan", "magcache", "torch"), ("wan", "taylorseer", "torch"),
    ("flux1", "taylorseer", "torchax"), ("flux1", "fbcache", "torchax"), ("flux2-klein", "magcache", "torchax"),
    ("wan", "fbcache", "torchax"), ("wan", "magcache", "torchax"),
]
NEVER_SKIPPING_CASES = [("wan", "fbcache"), ("flux2-klein", "magcache"), ("flux1", "taylorseer"),
                        ("flux2", "taylorseer-attention")]


def request_for(tiny_models, family: str, store, **options) -> Request:
    defaults = dict(model=str(tiny_models(family)), prompts=[FAMILIES[family].prompt], seeds=[SEED], steps=STEPS,
                    store=str(store), **FAMILIES[family].size)
    return Request(**{**defaults, **options})


@pytest.fixture(scope="module")
def calibrations(tiny_models, tmp_path_factory):
    """`calibrations(family)` → (store folder, its MagCache calibration file for the tiny model), made once
    per module by the command users run."""
    done = {}

    def get(family: str):
        if family not in done:
            store = tmp_path_factory.mktemp(f"calibration-{family}")
            args = ["calibrate-cache", "--model", str(tiny_models(family)), "--prompt", FAMILIES[family].prompt,
                    "--seed", str(SEED), "--steps", str(STEPS), "--store", str(store)]
            assert main(args + [f"--{name}={value}" for name, value in FAMILIES[family].size.items()]) == 0
            (calibration,) = (store / "calibration").rglob("*.json")
            done[family] = (store, calibration)
        return done[family]

    return get


def store_with_calibration(calibrations, family: str, store):
    calibrated, _ = calibrations(family)
    shutil.copytree(calibrated / "calibration", store / "calibration")
    return store


@functools.lru_cache(maxsize=None)
def diffusers_latents(family: str, folder: str, make_config=None, ratios: tuple | None = None):
    """(latents, calls of the tail probe) of diffusers' own pipeline, with `make_config(ratios)` applied
    through `enable_cache` when given."""
    pipe = reference_pipeline(FAMILIES[family].pipeline, folder)
    transformer = pipe.transformer
    calls = []
    probe = transformer.get_submodule(FAMILIES[family].tail_probe).register_forward_hook(lambda *_: calls.append(1))
    if make_config is not None:
        transformer.enable_cache(make_config(list(ratios) if ratios else None))
    try:
        # Flux2Pipeline calls its transformer outside any cache context, which the hooks need.
        with transformer.cache_context("cond"):
            output = pipe(generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent",
                          **FAMILIES[family].call)
    finally:
        probe.remove()
        if make_config is not None:
            transformer.disable_cache()
    return getattr(output, "images", None) if family != "wan" else output.frames, len(calls)


def ratios_for(calibrations, family: str, method: str, spec: str) -> tuple | None:
    if method != "magcache":
        return None
    if family == "flux1":
        return tuple(FLUX_MAG_RATIOS.tolist())
    return tuple(json.loads(calibrations(family)[1].read_text())["ratios"])


@pytest.mark.parametrize("family, method", NEVER_SKIPPING_CASES)
def test_a_cache_that_never_skips_equals_the_uncached_run(tiny_models, calibrations, tmp_path, family, method):
    spec, make_config = NEVER_SKIPPING[method]
    store = store_with_calibration(calibrations, family, tmp_path) if method == "magcache" else tmp_path
    request = request_for(tiny_models, family, store, cache=spec)
    latents = denoised_latents(request)
    folder = str(tiny_models(family))
    uncached, all_calls = diffusers_latents(family, folder)
    cached, calls = diffusers_latents(family, folder, make_config, ratios_for(calibrations, family, method, spec))
    assert calls == all_calls and torch.equal(cached, uncached)
    assert relative_error(latents, uncached) < 1e-5


@pytest.mark.parametrize("family, method, backend", SKIPPING_CASES)
def test_a_skipping_cache_runs_fewer_blocks_and_equals_the_diffusers_pipeline(tiny_models, calibrations, tmp_path,
                                                                              family, method, backend):
    spec, make_config = SKIPPING[method]
    store = store_with_calibration(calibrations, family, tmp_path) if method == "magcache" else tmp_path
    request = request_for(tiny_models, family, store, cache=spec, backend=backend)
    runs_before = region_runs(request)
    latents = denoised_latents(request)
    folder = str(tiny_models(family))
    uncached, all_calls = diffusers_latents(family, folder)
    expected, calls = diffusers_latents(family, folder, make_config, ratios_for(calibrations, family, method, spec))
    assert calls < all_calls
    assert relative_error(latents, expected) < 1e-3
    # Nearer to the skipping pipeline than to the exact one: stagediff skipped where diffusers did.
    assert relative_error(latents, uncached) > max(10 * relative_error(latents, expected), 1e-5)
    if backend == "torchax":
        # The last block's program ran in the same share of transformer calls as diffusers' last block.
        runs = region_runs(request) - runs_before
        tail = FAMILIES[family].tail_probe.split(".attn")[0]
        assert runs["norm_out"] > 0 and runs[tail] * all_calls == runs["norm_out"] * calls


def region_runs(request: Request) -> collections.Counter:
    """How often each region of the loaded torchax denoiser ran so far, when it is the request's model."""
    loaded = stages._loaded.get(stages.DENOISE)
    # The key: (folder, fingerprint, dtype, backend, mesh, LoRAs).
    if loaded is None or (loaded.key[0], *loaded.key[2:4]) != (request.model, request.dtype, "torchax"):
        return collections.Counter()
    return collections.Counter(loaded.pipe.transformer.regions.runs)


def run_denoise(request: Request):
    plan = make_plan(request)
    stages.encode(plan)
    return stages.denoise(plan)


def denoised_latents(request: Request) -> torch.Tensor:
    """Encode and denoise the request's one item; its stored latents."""
    run_denoise(request)
    item = make_plan(request).items[0]
    return make_plan(request).store.read_tensors(item.latents_path, item.latents_key)["latents"]


def test_torchax_compiles_each_region_once_per_shape(tiny_models, tmp_path):
    stages.release(stages.DENOISE)
    request = request_for(tiny_models, "flux1", tmp_path, cache="fbcache:100", backend="torchax", seeds=[0, 1, 2])
    denoised = run_denoise(request)
    regions = stages._loaded[stages.DENOISE].pipe.transformer.regions
    # Regions of one structure share a program: FLUX.1's embedders, norm and projection, and one program
    # for its double-stream blocks and one for its single-stream blocks.
    assert denoised.computed == 3
    assert denoised.compiles == regions.compile_count == len(set(regions._groups.values())) == 8
    assert regions.runs["single_transformer_blocks.0"] == 3 < regions.runs["transformer_blocks.0"] == 3 * STEPS


def test_a_cache_on_a_device_mesh_equals_one_device(tiny_models, tmp_path):
    """Regions get their weights as the mesh placed them (Wan: tensor parallel over 4 of 8 virtual devices)."""
    options = dict(cache="taylorseer:2,warmup=2", backend="torchax")
    one_device = denoised_latents(request_for(tiny_models, "wan", tmp_path / "one", **options))
    sharded = denoised_latents(request_for(tiny_models, "wan", tmp_path / "mesh", mesh="dp=2,tp=4", **options))
    assert relative_error(sharded, one_device) < 1e-4


@pytest.mark.parametrize("family", ["wan", "flux2-klein"])
def test_calibrate_cache_stores_the_ratios_diffusers_calibration_reports(tiny_models, calibrations, family):
    store, calibration = calibrations(family)
    stored = json.loads(calibration.read_text())
    folder = str(tiny_models(family))
    pipe = reference_pipeline(FAMILIES[family].pipeline, folder)
    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=STEPS))
    printed = io.StringIO()
    try:
        with redirect_stdout(printed):
            pipe(generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent", **FAMILIES[family].call)
    finally:
        pipe.transformer.disable_cache()
    # diffusers prints one list per cache context: Wan's cond and uncond, whose mean stagediff's paired
    # call calibrates; distilled klein runs no CFG.
    reported = [json.loads(line) for line in printed.getvalue().splitlines()
                if line.startswith("[") and not line.startswith("[MagCache]")]
    assert len(reported) == (2 if family == "wan" else 1)
    assert stored["steps"] == STEPS and stored["family"] == family and len(stored["ratios"]) == STEPS
    assert torch.allclose(torch.tensor(stored["ratios"]), torch.tensor(reported).mean(dim=0), rtol=1e-4)
    plan = make_plan(request_for(tiny_models, family, store, cache="magcache"))
    assert plan.points[0].settings.cache.ratios == tuple(stored["ratios"])
    assert plan.items[0].latents_inputs["denoise"]["cache"]["ratios_from"] == "calibration"


def test_cache_settings_are_in_the_key_the_manifest_and_the_png(tiny_models, tmp_path):
    keys = {spec: make_plan(request_for(tiny_models, "flux1", tmp_path, cache=spec)).items[0]
            for spec in ("none", "fbcache", "fbcache:0.05", "fbcache:0.1", "magcache", "taylorseer", "taylorseer:4")}
    assert keys["fbcache"].latents_key == keys["fbcache:0.05"].latents_key  # the default threshold, spelled out
    distinct = [keys[spec] for spec in keys if spec != "fbcache"]
    assert len({item.latents_key for item in distinct}) == len({item.media_key for item in distinct}) == len(distinct)
    assert "cache" not in keys["none"].latents_inputs["denoise"]  # uncached keys are what they always were
    # Shipped ratios are named by the diffusers version that ships them (planning imports no diffusers).
    assert keys["magcache"].latents_inputs["denoise"]["cache"]["ratios_from"] == shipped_ratios_source()

    request = request_for(tiny_models, "flux1", tmp_path, cache="fbcache:0.1")
    run_all_stages(request)
    plan = make_plan(request)
    expected = {"method": "fbcache", "threshold": 0.1}
    assert manifest_of(plan)["settings"]["cache"] == expected
    assert read_png_metadata(plan.store.read_bytes(plan.items[0].media_path))["cache"] == expected


BAD_SETTINGS = {
    "unknown method": ("flux1", ["--cache", "teacache"], "--cache teacache: unknown method 'teacache'"),
    "negative threshold": ("flux1", ["--cache", "fbcache:-0.1"], "threshold must be a number of at least 0"),
    "unknown parameter": ("wan", ["--cache", "magcache:speed=2"], "magcache has no parameter 'speed'"),
    "bad value": ("wan", ["--cache", "taylorseer:interval=0"], "interval must be an integer of at least 1"),
    "sdxl": ("sdxl", ["--cache", "fbcache"], "sdxl models have no step-cache hooks in diffusers"),
    "fbcache on FLUX.2": ("flux2-klein", ["--cache", "fbcache"], "does not run on flux2-klein models"),
    "fbcache batched": ("flux1", ["--cache", "fbcache", "--batch-size", "2"], "use --batch-size 1"),
    "attention taylorseer on torchax": ("flux1", ["--cache", "taylorseer-attention", "--backend", "torchax"],
                                        "use taylorseer or --backend torch"),
    "attention taylorseer on Wan": ("wan", ["--cache", "taylorseer-attention"], "would cache nothing"),
    "magcache uncalibrated": ("wan", ["--cache", "magcache"], "run `stagediff calibrate-cache"),
}


@pytest.mark.parametrize("case", BAD_SETTINGS, ids=list(BAD_SETTINGS))
def test_bad_cache_settings_fail_with_one_line_and_no_artifacts(tiny_models, tmp_path, capsys, case):
    family, options, expected = BAD_SETTINGS[case]
    store = tmp_path / "store"
    args = ["generate", "--model", str(tiny_models(family)), "--prompt", "a cat", "--seed", "0", "--seed", "1",
            "--store", str(store), *options]
    assert expected in one_line_error(args, capsys)
    assert not store.exists()
