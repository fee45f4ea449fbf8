"""Step caching: diffusers' cache hooks (First Block Cache, MagCache, TaylorSeer) on the denoiser, opt in with
`--cache METHOD[:VALUE][,NAME=VALUE...]` (`fbcache:0.1`, `magcache:threshold=0.1,max_skip=2`,
`taylorseer:interval=4,order=2`).

The methods and their parameters are the table `METHODS`. A request's cache resolves, against its model and
backend, to a `StepCache`, which the latents key, the manifest and the media metadata record. `applied` turns
it on around one pipeline call, with fresh hook state each time: on the torch backend through the
transformer's `enable_cache`; on torchax the transformer runs region by region (`tpu_ops.regions`), so the
hooks decide on the host, between compiled programs, whether to run the next ones.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from stagediff.errors import StagediffError

NONE = "none"


@dataclass(frozen=True)
class Parameter:
    """One parameter of a method as `--cache` names it, its type (float or int) and range."""

    name: str
    kind: type
    default: float
    minimum: float = 0
    maximum: float | None = None

    def parse(self, spec: str, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            value = None
        if value is None or not (value >= self.minimum and (self.maximum is None or value <= self.maximum)):
            kind = "an integer" if self.kind is int else "a number"
            upper = f" and at most {self.maximum}" if self.maximum is not None else ""
            raise StagediffError(f"--cache {spec}: {self.name} must be {kind} of at least {self.minimum}{upper}, "
                                 f"not {text!r}")
        return value


@dataclass(frozen=True)
class Method:
    """A step-cache method: its parameters (the first is the one a bare value sets) and how it runs."""

    name: str
    parameters: tuple[Parameter, ...]
    make_config: Callable[[Mapping, int, torch.dtype, tuple | None], Any]
    """(parameter values, steps, dtype, magnitude ratios) → the diffusers cache config."""
    decides_per_call: bool = False
    """Its skip decision reads the activations of the whole transformer call: every item of a batch, and
    cond with uncond when they share a call. So items run one per call and cond/uncond apart, as the
    pipeline makes them, or an item's latents would depend on what it was batched with."""
    needs_ratios: bool = False
    """Needs the model's magnitude ratios (shipped with diffusers, or from `stagediff calibrate-cache`)."""
    hooks_inside_blocks: bool = False
    """Its hooks sit inside the transformer blocks, which torchax compiles whole."""


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


TAYLORSEER_PARAMETERS = (Parameter("interval", int, 5, minimum=1), Parameter("warmup", int, 3), Parameter("order", int, 1))


METHODS: dict[str, Method] = {method.name: method for method in (
    # Skips the remaining blocks while the first block's output changes less than `threshold` (relative).
    Method("fbcache", (Parameter("threshold", float, 0.05),), _first_block_cache, decides_per_call=True),
    # Skips blocks while the accumulated magnitude-ratio error stays under `threshold`, at most `max_skip`
    # steps in a row, never in the first `retention` fraction of the steps.
    Method("magcache", (Parameter("threshold", float, 0.06), Parameter("max_skip", int, 3),
                        Parameter("retention", float, 0.2, maximum=1.0)), _mag_cache, needs_ratios=True),
    # Predicts the transformer's output by a Taylor expansion of order `order` (skipping every block),
    # computing it every `interval` steps after the first `warmup` (diffusers' lite TaylorSeer).
    Method("taylorseer", TAYLORSEER_PARAMETERS, _taylorseer_cache(lite=True)),
    # The same for each attention module's output only (diffusers' default TaylorSeer): the rest of every
    # block still runs.
    Method("taylorseer-attention", TAYLORSEER_PARAMETERS, _taylorseer_cache(lite=False), hooks_inside_blocks=True),
)}


def parse_cache(spec: str) -> tuple[Method, dict] | None:
    """`--cache` text → (method, parameter values with defaults filled in); None for `none`."""
    if not isinstance(spec, str):
        raise StagediffError(f"--cache {spec!r} must be text such as fbcache:0.1")
    if spec == NONE:
        return None
    name, _, arguments = spec.partition(":")
    method = METHODS.get(name)
    if method is None:
        raise StagediffError(f"--cache {spec}: unknown method {name!r} (one of {NONE}, {', '.join(METHODS)})")
    values = {parameter.name: parameter.default for parameter in method.parameters}
    by_name = {parameter.name: parameter for parameter in method.parameters}
    for index, argument in enumerate(arguments.split(",") if arguments else ()):
        name, equals, text = argument.partition("=")
        if not equals:
            if index:
                raise StagediffError(f"--cache {spec}: {argument!r} should be NAME=VALUE after the first value")
            name, text = method.parameters[0].name, argument
        if name not in by_name:
            raise StagediffError(f"--cache {spec}: {method.name} has no parameter {name!r} "
                                 f"(its parameters: {', '.join(by_name)})")
        values[name] = by_name[name].parse(spec, text)
    return method, values


@dataclass(frozen=True)
class StepCache:
    """A resolved step cache: the method, all its parameter values, and MagCache's magnitude ratios."""

    method: Method
    values: Mapping[str, Any]
    ratios: tuple[float, ...] | None = None
    ratios_from: str | None = None
    """Where the ratios come from: `diffusers` (shipped with it) or `calibration` (stagediff calibrate-cache)."""

    @property
    def decides_per_call(self) -> bool:
        return self.method.decides_per_call

    @property
    def settings(self) -> dict:
        """What the latents key, the manifest and the media metadata record."""
        settings = {"method": self.method.name, **self.values}
        if self.ratios is not None:
            digest = hashlib.sha256(json.dumps(list(self.ratios)).encode()).hexdigest()[:16]
            settings.update(ratios=digest, ratios_from=self.ratios_from)
        return settings

    def diffusers_config(self, steps: int, dtype: str):
        return self.method.make_config(self.values, steps, getattr(torch, dtype), self.ratios)


@dataclass(frozen=True)
class MagCacheCalibration:
    """MagCache in calibration mode: it never skips and records each step's magnitude ratio."""

    decides_per_call = False

    def diffusers_config(self, steps: int, dtype: str):
        from diffusers import MagCacheConfig

        return MagCacheConfig(calibrate=True, num_inference_steps=steps)


def resolve_cache(request, model) -> StepCache | None:
    """The request's `--cache` for its model, or a one-line error for a combination that cannot run."""
    parsed = parse_cache(request.cache)
    if parsed is None:
        return None
    method, values = parsed
    family = model.family
    if not family.step_cache_hooks:
        from stagediff.families import FAMILIES

        hooked = ", ".join(name for name, other in FAMILIES.items() if other.step_cache_hooks)
        raise StagediffError(f"--cache {request.cache}: {family.name} models have no step-cache hooks in diffusers "
                             f"(they exist for {hooked})")
    if method.name in family.unsupported_cache_methods:
        raise StagediffError(f"--cache {request.cache} does not run on {family.name} models: "
                             f"{family.unsupported_cache_methods[method.name]}")
    if method.decides_per_call and request.batch_size > 1:
        raise StagediffError(f"--cache {request.cache} decides for a whole batch at once (an item's latents would "
                             f"depend on its batch-mates): use --batch-size 1")
    if method.hooks_inside_blocks:
        from stagediff.backends import resolve_backend

        if resolve_backend(request.backend) == "torchax":
            raise StagediffError(f"--cache {request.cache} caches attention inside the transformer blocks, which "
                                 "torchax compiles whole: use taylorseer or --backend torch")
    if not method.needs_ratios:
        return StepCache(method, values)
    return StepCache(method, values, *magcache_ratios(request, model))


# -- MagCache's magnitude ratios --------------------------------------------------------------------
def calibration_path(model) -> str:
    """Where `stagediff calibrate-cache` stores a model's MagCache ratios: keyed by its denoiser's fingerprint."""
    family = model.family
    return f"calibration/{family.name}/{model.fingerprint(family.denoise_components)}.magcache.json"


def magcache_ratios(request, model) -> tuple[tuple[float, ...], str]:
    """(ratios, where from): this model's calibration in the store, else the ratios diffusers ships for its
    family, else a one-line error saying how to calibrate."""
    from stagediff.store import Store

    store, path = Store(request.store), calibration_path(model)
    if store.exists(path):
        try:
            return tuple(float(r) for r in json.loads(store.read_bytes(path))["ratios"]), "calibration"
        except (ValueError, KeyError, TypeError):
            raise StagediffError(f"unreadable MagCache calibration {store.uri_of(path)}: "
                                 "run `stagediff calibrate-cache` again") from None
    shipped = model.family.shipped_magcache_ratios()
    if shipped is not None:
        return tuple(shipped), "diffusers"
    raise StagediffError(f"--cache {request.cache} needs magnitude ratios for {request.model}: diffusers ships none "
                         f"for {model.family.name} models; run `stagediff calibrate-cache --model {request.model} "
                         "--prompt P --seed S` (same store) first")


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
def applied(pipe, component: str, settings, backend: str):
    """`settings.cache` on the pipeline's denoiser `component` for the calls made inside; hooks and their state
    are gone afterwards (so nothing carries over from one call or item to the next)."""
    cache = settings.cache
    if cache is None:
        yield
        return
    denoiser = getattr(pipe, component)
    if backend == "torchax":
        # The compiled denoiser, run region by region: the hooks wrap the regions' compiled programs.
        runner, module = denoiser.regions, denoiser.module
        regions = runner.installed()
    else:
        runner, module, regions = denoiser, denoiser, contextlib.nullcontext()
    with regions:
        module.enable_cache(cache.diffusers_config(settings.steps, settings.dtype))
        object.__setattr__(pipe, component, runner)
        try:
            # Flux2Pipeline calls its transformer outside any cache context, which the hooks need; pipelines
            # that set their own (cond, uncond) replace this one for each call.
            with module.cache_context("cond"):
                yield
        finally:
            object.__setattr__(pipe, component, denoiser)
            module.disable_cache()
