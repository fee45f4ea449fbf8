"""What the user asks for: prompts × seeds and the generation options, validated up front."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

from stagediff.errors import StagediffError

DTYPES = ("float32", "bfloat16")
BACKENDS = ("auto", "torch", "torchax")
DEFAULT_STORE = "./stagediff-store"


@dataclass(frozen=True)
class Request:
    """One batch: every prompt with every seed. Options left as None take the family's defaults."""

    model: str
    prompts: tuple[str | dict, ...]
    """Prompt texts, or `{"prompt": ..., "negative_prompt": ...}` for a prompt with its own negative."""
    seeds: tuple[int, ...]
    negative_prompt: str | None = None
    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    fps: int | None = None
    dtype: str = "float32"
    store: str = DEFAULT_STORE
    backend: str = "auto"
    batch_size: int = 1
    cache: str = "none"
    """Step caching, `METHOD[:VALUE][,NAME=VALUE...]` (see `stagediff.step_cache`); `none` denoises exactly."""
    mesh: str | None = None
    """Device mesh for the torchax backend, e.g. `dp=2,tp=4` (default: one device, or on a multi-chip
    TPU host `tpu_ops.mesh.default_mesh_spec`)."""
    vae_tiling: bool = False
    """Decode in tiles even when one piece would fit the device's memory."""
    extras: dict = field(default_factory=dict)
    """Family-specific options (for example `flow_shift` for Wan)."""

    def __post_init__(self):
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "seeds", tuple(self.seeds))
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
        _check_positive("steps", self.steps)
        _check_positive("height", self.height)
        _check_positive("width", self.width)
        _check_positive("frames", self.frames)
        _check_positive("fps", self.fps)
        _check_positive("batch-size", self.batch_size)
        if self.guidance is not None and not self.guidance >= 0:
            raise StagediffError(f"--guidance {self.guidance!r} must be a non-negative number")
        if self.mesh is not None:
            from tpu_ops.mesh import MeshError, parse_mesh_spec

            try:
                parse_mesh_spec(self.mesh)
            except MeshError as error:
                raise StagediffError(str(error)) from None
        if not isinstance(self.vae_tiling, bool):
            raise StagediffError(f"--vae-tiling {self.vae_tiling!r} must be true or false")
        from stagediff.step_cache import parse_cache

        parse_cache(self.cache)
        if self.backend not in BACKENDS:
            raise StagediffError(f"--backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.dtype not in DTYPES:
            raise StagediffError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")

    def replace(self, **changes) -> "Request":
        """This request with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def prompt_pairs(self) -> tuple[tuple[str, str | None], ...]:
        """Each distinct (prompt text, its own negative prompt or None), in order."""
        pairs = ((p["prompt"], p.get("negative_prompt")) if isinstance(p, dict) else (p, None) for p in self.prompts)
        return tuple(dict.fromkeys(pairs))

    def to_dict(self) -> dict:
        """Plain JSON-able parameters (for Prefect flows and the manifest)."""
        data = asdict(self)
        data["prompts"], data["seeds"] = list(self.prompts), list(self.seeds)
        return data


def _check_positive(option: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StagediffError(f"--{option} {value!r} must be a positive integer")
