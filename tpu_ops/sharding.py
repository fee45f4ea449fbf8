"""Sharding rules as data: ordered tables of (regex on the torch parameter name, partition spec).

torch Linear weights are `[out, in]`, so a column-parallel in-projection is `("tp", None)` and a
row-parallel out-projection `(None, "tp")`; its bias follows the output dimension (`("tp",)` for
column-parallel, replicated for row-parallel). Parameters no rule matches are replicated, or, on a
mesh with an `fsdp` axis, sharded along their first dimension that `fsdp` divides. A dimension a
rule shards but the axis does not divide is replicated instead (tiny test models have odd sizes).
"""

from __future__ import annotations

import re

Rule = tuple[str, tuple]

COLUMN = ("tp", None)
ROW = (None, "tp")
COLUMN_BIAS = ("tp",)

SDXL_UNET: list[Rule] = [
    (r".*attn[12]\.to_[qkv]\.weight", COLUMN),
    (r".*attn[12]\.to_out\.0\.weight", ROW),
    (r".*ff\.net\.0\.proj\.weight", COLUMN),
    (r".*ff\.net\.0\.proj\.bias", COLUMN_BIAS),
    (r".*ff\.net\.2\.weight", ROW),
]

FLUX1_TRANSFORMER: list[Rule] = [
    (r".*attn\.(to_[qkv]|add_[qkv]_proj)\.weight", COLUMN),
    (r".*attn\.(to_[qkv]|add_[qkv]_proj)\.bias", COLUMN_BIAS),
    (r".*attn\.(to_out\.0|to_add_out)\.weight", ROW),
    (r".*ff(_context)?\.net\.0\.proj\.weight", COLUMN),
    (r".*ff(_context)?\.net\.2\.weight", ROW),
    (r"single_transformer_blocks\.\d+\.proj_mlp\.weight", COLUMN),
]

FLUX2_TRANSFORMER: list[Rule] = [
    (r".*attn\.(to_[qkv]|add_[qkv]_proj|to_qkv_mlp_proj)\.weight", COLUMN),
    (r".*attn\.(to_out\.0|to_add_out|to_out)\.weight", ROW),
    (r".*ff(_context)?\.linear_in\.weight", COLUMN),
    (r".*ff(_context)?\.linear_out\.weight", ROW),
]

WAN_TRANSFORMER: list[Rule] = [
    (r"blocks\.\d+\.attn[12]\.to_[qkv]\.weight", COLUMN),
    (r"blocks\.\d+\.attn[12]\.to_[qkv]\.bias", COLUMN_BIAS),
    (r"blocks\.\d+\.attn[12]\.to_out\.0\.weight", ROW),
    (r"blocks\.\d+\.ffn\.net\.0\.proj\.weight", COLUMN),
    (r"blocks\.\d+\.ffn\.net\.0\.proj\.bias", COLUMN_BIAS),
    (r"blocks\.\d+\.ffn\.net\.2\.weight", ROW),
]

RULES: dict[str, list[Rule]] = {
    "sdxl": SDXL_UNET,
    "flux1": FLUX1_TRANSFORMER,
    "flux2": FLUX2_TRANSFORMER,
    "flux2-klein": FLUX2_TRANSFORMER,
    "wan": WAN_TRANSFORMER,
}
"""Rule table per model family, for the denoiser (UNet or transformer) the backend compiles."""


class ShardingRuleError(ValueError):
    """A rule table that does not fit the model: a dead rule, or a parameter matched twice."""


def partition_specs(shapes: dict[str, tuple[int, ...]], rules: list[Rule], axis_sizes: dict[str, int]) -> dict[str, tuple]:
    """Parameter name -> partition spec (a tuple of axis names or None per dimension)."""
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]
    used = [False] * len(compiled)
    specs = {}
    for name, shape in shapes.items():
        matches = [index for index, (pattern, _) in enumerate(compiled) if pattern.fullmatch(name)]
        if len(matches) > 1:
            raise ShardingRuleError(f"parameter {name} matches several rules: {[rules[i][0] for i in matches]}")
        if matches:
            used[matches[0]] = True
            spec = compiled[matches[0]][1]
        else:
            spec = (None,) * len(shape)
        spec = _fit(spec, shape, axis_sizes)
        if "fsdp" in axis_sizes and all(axis is None for axis in spec):
            spec = _fsdp(shape, axis_sizes["fsdp"])
        specs[name] = spec
    dead = [rules[i][0] for i, was_used in enumerate(used) if not was_used]
    if dead:
        raise ShardingRuleError(f"sharding rules match no parameter: {dead}")
    return specs


def _fit(spec: tuple, shape: tuple[int, ...], axis_sizes: dict[str, int]) -> tuple:
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    return tuple(
        axis if axis is None or (axis in axis_sizes and size % axis_sizes[axis] == 0) else None
        for axis, size in zip(spec, shape)
    )


def _fsdp(shape: tuple[int, ...], size: int) -> tuple:
    for dim, length in enumerate(shape):
        if length % size == 0:
            return tuple("fsdp" if d == dim else None for d in range(len(shape)))
    return (None,) * len(shape)
