"""Device meshes from a short spec such as `dp=2,tp=4`, `tp=8` or `fsdp=8`.

Axes: `dp` splits the batch (items, and CFG cond/uncond pairs), `tp` splits weights Megatron-style
(see sharding.py), `fsdp` shards every weight along its first divisible dimension and lets XLA gather
it per layer. Multi-host TPU slices call `jax.distributed.initialize()` first (`initialize_multihost`).
"""

from __future__ import annotations

import math
import os

AXES = ("dp", "fsdp", "tp")
MULTIHOST_VARIABLE = "STAGEDIFF_MULTIHOST"


class MeshError(ValueError):
    """A mesh spec that does not fit the devices."""


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """`"dp=2,tp=4"` -> {"dp": 2, "tp": 4}, axes in canonical order; a one-line error otherwise."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in AXES or not value.isdigit() or int(value) < 1 or name in sizes:
            raise MeshError(f"--mesh {spec!r}: each part must be AXIS=SIZE with AXIS one of {', '.join(AXES)}, once")
        sizes[name] = int(value)
    if not sizes:
        raise MeshError(f"--mesh {spec!r} names no axis")
    return {axis: sizes[axis] for axis in AXES if axis in sizes}


def make_mesh(spec: str | None, devices=None):
    """A `jax.sharding.Mesh` for `spec`; None means all devices on `tp`."""
    import jax
    import numpy as np

    devices = list(devices if devices is not None else jax.devices())
    sizes = parse_mesh_spec(spec) if spec else {"tp": len(devices)}
    if math.prod(sizes.values()) != len(devices):
        raise MeshError(f"--mesh {spec!r} needs {math.prod(sizes.values())} devices, there are {len(devices)}")
    return jax.sharding.Mesh(np.array(devices).reshape(tuple(sizes.values())), tuple(sizes))


def default_mesh_spec(device_count: int, batch_size: int, model_bytes: int, device_bytes: int | None) -> str | None:
    """The layout when no mesh is asked for: one device alone needs none; a model that fits a device
    (within half its memory, leaving room for activations) puts items on `dp` as far as the batch
    divides the devices and the rest on `tp`; a model that does not fit puts every device on `tp`."""
    if device_count <= 1:
        return None
    fits = device_bytes is None or model_bytes <= device_bytes // 2
    dp = math.gcd(device_count, batch_size) if fits else 1
    sizes = {"dp": dp, "tp": device_count // dp}
    return ",".join(f"{axis}={size}" for axis, size in sizes.items() if size > 1)


def initialize_multihost() -> bool:
    """On a multi-host TPU slice (`STAGEDIFF_MULTIHOST=1`), join the other hosts before using devices."""
    if os.environ.get(MULTIHOST_VARIABLE) != "1":
        return False
    import jax

    jax.distributed.initialize()
    return True
