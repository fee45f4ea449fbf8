"""What the user asks for: prompts × seeds and the generation options, validated up front."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from numbers import Real

from stagediff.errors import StagediffError

DTYPES = ("float32", "bfloat16")
BACKENDS = ("auto", "torch", "torchax")
DEFAULT_STORE = "./stagediff-store"
GRID_FIELDS = ("steps", "guidance")
"""Fields that take one value or a list of them (as do family options in `extras`): a run renders
every combination of the listed values."""
DEFAULT_LORA_SCALE = 1.0
AUTO = "auto"
"""`--batch-size auto`: as many items of one shape per call as the stage's device memory holds (up to a
cap), decided where the stage runs."""


@dataclass(frozen=True)
class Request:
    """One batch: every prompt with every seed. Options left as None take the family's defaults."""

    model: str
    prompts: tuple[str | dict, ...]
    """Prompt texts, or `{"prompt": ..., "negative_prompt": ...}` for a prompt with its own negative."""
    seeds: tuple[int, ...]
    negative_prompt: str | None = None
    steps: int | tuple[int, ...] | None = None
    guidance: float | tuple[float, ...] | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    fps: int | None = None
    dtype: str = "float32"
    store: str = DEFAULT_STORE
    backend: str = "auto"
    batch_size: int | str = AUTO
    """Items denoised and decoded per call, or `auto`."""
    cache: str = "none"
    """Step caching, `METHOD[:VALUE][,NAME=VALUE...]` (see `stagediff.step_cache`); `none` denoises exactly."""
    mesh: str | None = None
    """Device mesh for the torchax backend, e.g. `dp=2,tp=4` (default: one device, or on a multi-chip
    TPU host `tpu_ops.mesh.default_mesh_spec`)."""
    vae_tiling: bool = False
    """Decode in tiles even when one piece would fit the device's memory."""
    extras: dict = field(default_factory=dict)
    """Family-specific options (for example `flow_shift` for Wan)."""
    loras: tuple[dict, ...] = ()
    """LoRA adapters, `{"source": ..., "scale": ...}` (or `"SOURCE[:SCALE]"`); a source listed with several
    scales is swept over them."""
    scores: tuple[str, ...] = ()
    """Scorers of the finished media, `clip[:MODEL]` (see `stagediff.scoring`): a score stage after decode."""

    def __post_init__(self):
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "seeds", tuple(self.seeds))
        for name in GRID_FIELDS:
            object.__setattr__(self, name, one_or_many(getattr(self, name)))
        object.__setattr__(self, "extras", {name: one_or_many(value) for name, value in self.extras.items()})
        object.__setattr__(self, "loras", tuple(parse_lora(lora) for lora in self.loras))
        object.__setattr__(self, "scores", tuple(self.scores))
        self.validate()

    def validate(self) -> None:
        """Raise StagediffError naming the first bad value."""
        if not self.model:
            raise StagediffError("--model is required")
        if not self.prompts:
            raise StagediffError("at least one --prompt (or a --prompt-file) is required")
        for prompt in self.prompts:
            text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
            if not isinstance(text, str) or not text.strip():
                raise StagediffError(f"--prompt {text!r} is empty")
            if isinstance(prompt, dict) and (set(prompt) - {"prompt", "negative_prompt"}
                                             or not isinstance(prompt.get("negative_prompt", ""), str)):
                raise StagediffError(f"--prompt {prompt!r}: a prompt is a text or {{\"prompt\", \"negative_prompt\"}}")
        if not self.seeds:
            raise StagediffError("at least one --seed is required")
        for seed in self.seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0 or seed >= 2**63:
                raise StagediffError(f"--seed {seed!r} must be a non-negative integer")
        for steps in values_of(self.steps):
            _check_positive("steps", steps)
        _check_positive("height", self.height)
        _check_positive("width", self.width)
        _check_positive("frames", self.frames)
        _check_positive("fps", self.fps)
        if self.batch_size != AUTO:
            _check_positive("batch-size", self.batch_size)
        for guidance in values_of(self.guidance):
            if guidance is not None and (not isinstance(guidance, Real) or not guidance >= 0):
                raise StagediffError(f"--guidance {guidance!r} must be a non-negative number")
        if self.mesh is not None:
            from tpu_ops.mesh import MeshError, parse_mesh_spec

            try:
                parse_mesh_spec(self.mesh)
            except MeshError as error:
                raise StagediffError(str(error)) from None
            if self.backend == "torch":
                raise StagediffError(f"--mesh {self.mesh} needs --backend torchax")
        if not isinstance(self.vae_tiling, bool):
            raise StagediffError(f"--vae-tiling {self.vae_tiling!r} must be true or false")
        from stagediff.cache_spec import parse_cache

        parse_cache(self.cache)
        if self.backend not in BACKENDS:
            raise StagediffError(f"--backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        from stagediff.scoring import check_scores

        check_scores(self.scores)
        if self.dtype not in DTYPES:
            raise StagediffError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")

    def replace(self, **changes) -> "Request":
        """This request with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def lora_scales(self) -> tuple[tuple[str, tuple[float, ...]], ...]:
        """Each distinct LoRA source with its scales, in the order given."""
        scales: dict[str, dict[float, None]] = {}
        for lora in self.loras:
            scales.setdefault(lora["source"], {})[lora["scale"]] = None
        return tuple((source, tuple(values)) for source, values in scales.items())

    @property
    def prompt_pairs(self) -> tuple[tuple[str, str | None], ...]:
        """Each distinct (prompt text, its own negative prompt or None), in order."""
        pairs = ((p["prompt"], p.get("negative_prompt")) if isinstance(p, dict) else (p, None) for p in self.prompts)
        return tuple(dict.fromkeys(pairs))

    def to_dict(self) -> dict:
        """Plain JSON-able parameters (for Prefect flows and the manifest)."""
        data = asdict(self)
        data["prompts"], data["seeds"], data["loras"] = list(self.prompts), list(self.seeds), list(self.loras)
        data["scores"] = list(self.scores)
        for name in GRID_FIELDS:
            data[name] = _plain(data[name])
        data["extras"] = {name: _plain(value) for name, value in self.extras.items()}
        return data


def one_or_many(value):
    """A grid value as the request keeps it: None, one value, or a tuple of two or more distinct values
    (a list of one is that value, so a single-valued request is the same whichever way it was given)."""
    if not isinstance(value, (list, tuple)):
        return value
    distinct = tuple(dict.fromkeys(value))
    if not distinct:
        return None
    return distinct[0] if len(distinct) == 1 else distinct


def values_of(value) -> tuple:
    """The values a grid field takes: `(None,)` when unset."""
    return value if isinstance(value, tuple) else (value,)


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def parse_lora(value: str | Mapping) -> dict:
    """`{"source": ..., "scale": ...}` from a mapping or from `SOURCE[:SCALE]` (the scale is what follows
    the last colon when it is a number, so `gs://` and `hf://` sources need no quoting); scale 1 by default."""
    if isinstance(value, Mapping):
        if set(value) - {"source", "scale"}:
            raise StagediffError(f"--lora {dict(value)!r}: a LoRA is {{\"source\": ..., \"scale\": ...}}")
        source, scale = value.get("source"), value.get("scale", DEFAULT_LORA_SCALE)
    else:
        source, scale = str(value), DEFAULT_LORA_SCALE
        head, colon, tail = source.rpartition(":")
        if colon and head:
            try:
                source, scale = head, float(tail)
            except ValueError:
                pass
    if not isinstance(source, str) or not source.strip():
        raise StagediffError(f"--lora {value!r}: no source (a .safetensors file, gs:// file or Hugging Face id)")
    if isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale):
        raise StagediffError(f"--lora {value!r}: the scale must be a number")
    return {"source": source.strip(), "scale": float(scale)}


def _check_positive(option: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StagediffError(f"--{option} {value!r} must be a positive integer")
