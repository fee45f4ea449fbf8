"""Where the denoise and decode stages compute: torch eager (CPU or CUDA) or torchax (JAX device)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from stagediff.errors import StagediffError
from stagediff.request import BACKENDS


def resolve_backend(requested: str) -> str:
    """`auto` means torchax on TPU, torch elsewhere (CUDA when present, else CPU)."""
    if requested not in BACKENDS:
        raise StagediffError(f"--backend {requested!r} is not one of {', '.join(BACKENDS)}")
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


def torch_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_placement(backend: str, mesh: str | None) -> None:
    """Fail with a one-line error, before any work, for a mesh the backend or the devices cannot take."""
    if mesh is None:
        return
    if resolve_backend(backend) != "torchax":
        raise StagediffError(f"--mesh {mesh} needs --backend torchax")
    from tpu_ops.mesh import MeshError, make_mesh

    try:
        make_mesh(mesh)
    except MeshError as error:
        raise StagediffError(str(error)) from None


def place_pipeline(pipe, backend: str, compiled_component: str | None, on_compile=None, mesh: str | None = None,
                   family: str | None = None):
    """Move a stage's pipeline onto its backend; with torchax, compile `compiled_component`, its
    weights sharded over `mesh` by the family's rule table when a mesh is given (`check_placement`
    has accepted it)."""
    if backend == "torch":
        return pipe.to(torch_device())
    from tpu_ops.attention import FAMILY_ATTENTION, AttentionConfig
    from tpu_ops.compiled_module import CompiledModule
    from tpu_ops.mesh import make_mesh
    from tpu_ops.sharding import RULES

    device_mesh = make_mesh(mesh) if mesh else None
    module = getattr(pipe, compiled_component)
    compiled = CompiledModule(module, on_compile=on_compile, mesh=device_mesh, rules=RULES.get(family, []),
                              attention=FAMILY_ATTENTION.get(family, AttentionConfig()))
    # register_modules would insist on a torch Module; the pipeline only calls it and reads attributes.
    object.__setattr__(pipe, compiled_component, compiled)
    return pipe
