"""Step caching as planning sees it: `--cache METHOD[:VALUE][,NAME=VALUE...]` (`fbcache:0.1`,
`magcache:threshold=0.1,max_skip=2`, `taylorseer:interval=4,order=2`), the methods and their parameters
(the table `METHODS`), and a request's cache resolved against its model to a `StepCache`, which the
latents key, the manifest and the media metadata record.

Turning a cache on (diffusers' hooks on the denoiser) is the denoise stage's part: `stagediff.step_cache`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

from stagediff.errors import StagediffError

NONE = "none"
SHIPPED = "diffusers"
CALIBRATED = "calibration"


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
    decides_per_call: bool = False
    """Its skip decision reads the activations of the whole transformer call: every item of a batch, and
    cond with uncond when they share a call. So items run one per call and cond/uncond apart, as the
    pipeline makes them, or an item's latents would depend on what it was batched with."""
    needs_ratios: bool = False
    """Needs the model's magnitude ratios (shipped with diffusers, or from `stagediff calibrate-cache`)."""
    hooks_inside_blocks: bool = False
    """Its hooks sit inside the transformer blocks, which torchax compiles whole."""


TAYLORSEER_PARAMETERS = (Parameter("interval", int, 5, minimum=1), Parameter("warmup", int, 3), Parameter("order", int, 1))

METHODS: dict[str, Method] = {method.name: method for method in (
    # Skips the remaining blocks while the first block's output changes less than `threshold` (relative).
    Method("fbcache", (Parameter("threshold", float, 0.05),), decides_per_call=True),
    # Skips blocks while the accumulated magnitude-ratio error stays under `threshold`, at most `max_skip`
    # steps in a row, never in the first `retention` fraction of the steps.
    Method("magcache", (Parameter("threshold", float, 0.06), Parameter("max_skip", int, 3),
                        Parameter("retention", float, 0.2, maximum=1.0)), needs_ratios=True),
    # Predicts the transformer's output by a Taylor expansion of order `order` (skipping every block),
    # computing it every `interval` steps after the first `warmup` (diffusers' lite TaylorSeer).
    Method("taylorseer", TAYLORSEER_PARAMETERS),
    # The same for each attention module's output only (diffusers' default TaylorSeer): the rest of every
    # block still runs.
    Method("taylorseer-attention", TAYLORSEER_PARAMETERS, hooks_inside_blocks=True),
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
    """A resolved step cache: the method, all its parameter values, and where MagCache's magnitude ratios
    come from: the model's calibration (the ratios themselves) or diffusers (those its version ships)."""

    method: Method
    values: Mapping[str, Any]
    ratios: tuple[float, ...] | None = None
    """Calibrated ratios; None for shipped ones, which the denoise stage reads from diffusers."""
    ratios_from: str | None = None
    """`calibration` (stagediff calibrate-cache) or `diffusers <version>` (shipped with that version)."""

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
        elif self.ratios_from is not None:
            settings.update(ratios_from=self.ratios_from)
        return settings


def shipped_ratios_source() -> str:
    """The identity of the ratios diffusers ships: the diffusers version (read without importing it)."""
    return f"{SHIPPED} {version('diffusers')}"


def resolve_cache(request, model) -> StepCache | None:
    """The request's `--cache` for its model, or a one-line error for a combination that cannot run.
    What depends on the device (a torchax backend chosen by `auto`) is checked again where the stage
    runs (`check_cache_backend`)."""
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
    if method.decides_per_call and isinstance(request.batch_size, int) and request.batch_size > 1:
        raise StagediffError(f"--cache {request.cache} decides for a whole batch at once (an item's latents would "
                             f"depend on its batch-mates): use --batch-size 1")
    if request.backend != "auto":
        check_cache_backend(request.cache, method, request.backend)
    if not method.needs_ratios:
        return StepCache(method, values)
    return StepCache(method, values, *magcache_ratios(request, model))


def check_cache_backend(spec: str, method: Method, backend: str) -> None:
    """A one-line error for a cache method the backend (`torch` or `torchax`) cannot run."""
    if method.hooks_inside_blocks and backend == "torchax":
        raise StagediffError(f"--cache {spec} caches attention inside the transformer blocks, which "
                             "torchax compiles whole: use taylorseer or --backend torch")


# -- MagCache's magnitude ratios --------------------------------------------------------------------
def calibration_path(model) -> str:
    """Where `stagediff calibrate-cache` stores a model's MagCache ratios: keyed by its denoiser's fingerprint."""
    family = model.family
    return f"calibration/{family.name}/{model.fingerprint(family.denoise_components)}.magcache.json"


def magcache_ratios(request, model) -> tuple[tuple[float, ...] | None, str]:
    """(calibrated ratios or None, where from): this model's calibration in the store, else the ratios
    diffusers ships for its family, else a one-line error saying how to calibrate."""
    from stagediff.store import Store

    store, path = Store(request.store), calibration_path(model)
    if store.exists(path):
        try:
            return tuple(float(r) for r in json.loads(store.read_bytes(path))["ratios"]), CALIBRATED
        except (ValueError, KeyError, TypeError):
            raise StagediffError(f"unreadable MagCache calibration {store.uri_of(path)}: "
                                 "run `stagediff calibrate-cache` again") from None
    if model.family.ships_magcache_ratios:
        return None, shipped_ratios_source()
    raise StagediffError(f"--cache {request.cache} needs magnitude ratios for {request.model}: diffusers ships none "
                         f"for {model.family.name} models; run `stagediff calibrate-cache --model {request.model} "
                         "--prompt P --seed S` (same store) first")
