"""Step caching in the denoise stage: diffusers' cache hooks (First Block Cache, MagCache, TaylorSeer) on the
denoiser, for a `StepCache` that planning resolved (`stagediff.cache_spec`).

`applied` turns it on around one pipeline call, with fresh hook state each time: on the torch backend through the
transformer's `enable_cache`; on torchax the transformer runs region by region (`tpu_ops.regions`), so the
hooks decide on the host, between compiled programs, whether to run the next ones.
"""

from __future__ import annotations

import ast
import contextlib
import io
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from stagediff.cache_spec import SHIPPED, StepCache, shipped_ratios_source
from stagediff.errors import StagediffError


def _first_block_cache(values, steps, dtype, ratios):
    from diffusers import FirstBlockCacheConfig

    return FirstBlockCacheConfig(threshold=values["threshold"])


def _mag_cache(values, steps, dtype, ratios):
    from diffusers import MagCacheConfig

    return MagCacheConfig(threshold=values["threshold"], max_skip_steps=values["max_skip"],
                          retention_ratio=values["retention"], num_inference_steps=steps, mag_ratios=list(ratios))


def _taylorseer_cache(lite: bool):
    def make_config(values, steps, dtype, ratios):
        from diffusers import TaylorSeerCacheConfig

        # Taylor factors in the run's dtype (diffusers' default is bfloat16 whatever the model's).
        return TaylorSeerCacheConfig(cache_interval=values["interval"], disable_cache_before_step=values["warmup"],
                                     max_order=values["order"], use_lite_mode=lite, taylor_factors_dtype=dtype)

    return make_config


CONFIGS: dict[str, Callable[[Mapping, int, torch.dtype, tuple | None], Any]] = {
    "fbcache": _first_block_cache,
    "magcache": _mag_cache,
    "taylorseer": _taylorseer_cache(lite=True),
    "taylorseer-attention": _taylorseer_cache(lite=False),
}
"""Method name (`stagediff.cache_spec.METHODS`) → (parameter values, steps, dtype, magnitude ratios) → the
diffusers cache config."""


def diffusers_config(cache: StepCache, steps: int, dtype: str, adapter):
    """The diffusers cache config of a resolved cache; shipped MagCache ratios come from the family's
    adapter, and only from the diffusers version the key names."""
    ratios = cache.ratios
    if cache.method.needs_ratios and ratios is None and cache.ratios_from.startswith(SHIPPED):
        if cache.ratios_from != shipped_ratios_source():
            raise StagediffError(f"--cache {cache.method.name}: planned with the ratios of {cache.ratios_from}, but "
                                 f"this worker has {shipped_ratios_source()}: run every machine on one diffusers version")
        ratios = tuple(adapter.magcache_ratios())
    return CONFIGS[cache.method.name](cache.values, steps, getattr(torch, dtype), ratios)


@dataclass(frozen=True)
class MagCacheCalibration:
    """MagCache in calibration mode: it never skips and records each step's magnitude ratio."""

    decides_per_call = False


@contextlib.contextmanager
def captured_calibration() -> Iterator[list[list[float]]]:
    """Collect the ratios MagCache's calibration reports at the end of each calibrated call (one list per
    cache context). diffusers prints them, with advice for its own users, so the print is captured here."""
    calls: list[list[float]] = []
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        yield calls
    # The report is a heading line followed by the ratios as a Python list.
    calls.extend(ast.literal_eval(line) for line in printed.getvalue().splitlines()
                 if line.startswith("[") and not line.startswith("[MagCache]"))


# -- turning the cache on ---------------------------------------------------------------------------
@contextlib.contextmanager
def applied(pipe, adapter, settings, backend: str):
    """`settings.cache` on the pipeline's denoiser `component` for the calls made inside; hooks and their state
    are gone afterwards (so nothing carries over from one call or item to the next)."""
    cache = settings.cache
    if cache is None:
        yield
        return
    component = adapter.family.denoiser_component
    denoiser = getattr(pipe, component)
    if backend == "torchax":
        # The compiled denoiser, run region by region: the hooks wrap the regions' compiled programs.
        runner, module = denoiser.regions, denoiser.module
        regions = runner.installed()
    else:
        runner, module, regions = denoiser, denoiser, contextlib.nullcontext()
    with regions:
        module.enable_cache(_config_of(cache, settings, adapter))
        object.__setattr__(pipe, component, runner)
        try:
            # Flux2Pipeline calls its transformer outside any cache context, which the hooks need; pipelines
            # that set their own (cond, uncond) replace this one for each call.
            with module.cache_context("cond"):
                yield
        finally:
            object.__setattr__(pipe, component, denoiser)
            module.disable_cache()


def _config_of(cache, settings, adapter):
    if isinstance(cache, MagCacheCalibration):
        from diffusers import MagCacheConfig

        return MagCacheConfig(calibrate=True, num_inference_steps=settings.steps)
    return diffusers_config(cache, settings.steps, settings.dtype, adapter)
