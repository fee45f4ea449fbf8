"""Where the denoise and decode stages compute: torch eager (CPU or CUDA) or torchax (JAX device)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import torch



def resolve_backend(requested: str) -> str:
    """`auto` means torchax on TPU, torch elsewhere (CUDA when present, else CPU)."""
    if requested != "auto":
        return requested
    return "torchax" if _jax_platform() == "tpu" else "torch"


@functools.lru_cache(maxsize=1)
def _jax_platform() -> str:
    try:
        import jax

        return jax.default_backend()
    except Exception:
        return "none"


def overlaps_stages(backend: str) -> bool:
    """Whether a batch run in this process encodes on the CPU while it denoises: only with an
    accelerator (on a CPU alone the stages would split the same cores: measured, denoise slows from
    6.1 to 7.6 s/item beside encode and decode threads)."""
    return not denoises_on_cpu(backend)


def denoises_on_cpu(backend: str) -> bool:
    """True when denoising with `backend` here would run on this machine's CPU (no GPU or TPU)."""
    if resolve_backend(backend) == "torch":
        return not torch.cuda.is_available()
    return _jax_platform() == "cpu"


def default_mesh(backend: str, batch_size: int, weights: Path) -> str | None:
    """The mesh when `--mesh` is not given: on a multi-chip TPU host, `tpu_ops.mesh.default_mesh_spec`
    for the model whose safetensors are in `weights` and this batch; elsewhere none (one device)."""
    if backend != "torchax" or _jax_platform() != "tpu":
        return None
    import jax

    from tpu_ops.mesh import default_mesh_spec

    model_bytes = sum(file.stat().st_size for file in weights.glob("*.safetensors"))
    memory = jax.local_devices()[0].memory_stats() or {}
    return default_mesh_spec(jax.device_count(), batch_size, model_bytes, memory.get("bytes_limit"))


def free_device_bytes(backend: str) -> int:
    """Memory free on the device a stage computes on: the first JAX device's (torchax), the CUDA
    device's, or the host's (CPU, also JAX's CPU backend, which reports none)."""
    if backend == "torchax":
        import jax

        stats = jax.local_devices()[0].memory_stats()
        if stats and "bytes_limit" in stats:
            return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    elif torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def device_mesh(spec: str | None):
    """The jax Mesh of a `--mesh` spec that `check_placement` has accepted (None: no mesh)."""
    if not spec:
        return None
    from tpu_ops.mesh import make_mesh

    return make_mesh(spec)


def torch_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def place_pipeline(pipe, backend: str, compiled_component: str | None, on_compile=None, mesh: str | None = None,
                   family: str | None = None):
    """Move a stage's pipeline onto its backend; with torchax, compile `compiled_component`, its
    weights sharded over `mesh` by the family's rule table when a mesh is given (`check_placement`
    has accepted it)."""
    if backend == "torch":
        return pipe.to(torch_device())
    from tpu_ops.attention import FAMILY_ATTENTION, AttentionConfig
    from tpu_ops.compiled_module import CompiledModule
    from tpu_ops.sharding import RULES

    module = getattr(pipe, compiled_component)
    compiled = CompiledModule(module, on_compile=on_compile, mesh=device_mesh(mesh), rules=RULES.get(family, []),
                              attention=FAMILY_ATTENTION.get(family, AttentionConfig()))
    # register_modules would insist on a torch Module; the pipeline only calls it and reads attributes.
    object.__setattr__(pipe, compiled_component, compiled)
    return pipe


@contextlib.contextmanager
def peak_growth(backend: str) -> Iterator[list[int]]:
    """Measures the peak memory a block adds on the device a stage computes on: CUDA's allocator peak, a
    JAX device's `peak_bytes_in_use`, or this process's resident high-water mark on a CPU (Linux). The
    list it yields holds the bytes after the block, and stays empty where the device reports nothing."""
    measured: list[int] = []
    if backend == "torchax":
        import jax

        device = jax.local_devices()[0]
        before = device.memory_stats() or {}
        yield measured
        after = device.memory_stats() or {}
        if "peak_bytes_in_use" in after and after["peak_bytes_in_use"] > before.get("peak_bytes_in_use", 0):
            measured.append(after["peak_bytes_in_use"] - before.get("bytes_in_use", 0))
    elif torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        yield measured
        measured.append(torch.cuda.max_memory_allocated() - before)
    elif _reset_resident_peak():
        before = _resident("VmRSS")
        yield measured
        measured.append(max(0, _resident("VmHWM") - before))
    else:
        yield measured


def _reset_resident_peak() -> bool:
    """Start this process's resident high-water mark afresh (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        return True
    except OSError:
        return False


def _resident(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0
