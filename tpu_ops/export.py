"""Lower the programs the accelerator path compiles for a TPU, on any machine.

`jax.export` with `platforms=["tpu"]` traces a program and lowers it for XLA:TPU, Pallas kernels
included (lowered to Mosaic), without a TPU: a lowering error shows on a CPU, not on a user's TPU
VM. Exporting only traces, so the module's weights need not exist: build it on the meta device
(`with torch.device("meta")`) and only their shapes and dtypes are used, at any size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tpu_ops.attention import AttentionConfig, AttentionPlacement, install_flash_attention, placed_attention
from tpu_ops.compiled_module import Flattened, input_spec, traceable_forward


@dataclass
class ExportedCall:
    """One lowered program and what calling it returns (meta tensors of the output shapes), so that a
    program whose outputs feed the next call (a decoder's feature cache) can be followed."""

    exported: object
    """The `jax.export.Exported`."""
    outputs: object


def export_call(module: torch.nn.Module, *args, platforms: tuple[str, ...] = ("tpu",), mesh=None,
                rules: list | None = None, attention: AttentionConfig = AttentionConfig(),
                input_layout: Callable[[tuple, object], tuple] = input_spec, **kwargs) -> ExportedCall:
    """Lower the program `CompiledModule(module, mesh=mesh, rules=rules, attention=attention,
    input_layout=input_layout)(*args, **kwargs)` compiles on TPU (flash attention on), for `platforms`.
    Tensors in the arguments (meta ones too) give shapes and dtypes; on a mesh, weights and inputs are
    laid out as CompiledModule lays them."""
    import jax
    import torchax
    from torchax.interop import JittableModule, jax_view

    from tpu_ops import torchax_fixes

    torchax_fixes.apply()
    env = torchax.default_env()
    install_flash_attention(env)
    jittable = JittableModule(module.eval())
    inputs = Flattened.of((args, kwargs))
    layouts: dict = {}
    forward = jax_view(traceable_forward(jittable, inputs, layouts))
    placement = AttentionPlacement(mesh, attention)

    def program(params, buffers, tensors):
        with env, placed_attention(placement):
            return forward(params, buffers, tensors)

    specs = _weight_specs(jittable.params, mesh, rules or [])
    exported = jax.export.export(jax.jit(program), platforms=list(platforms))(
        {name: _abstract(tensor, mesh, specs[name]) for name, tensor in jittable.params.items()},
        {name: _abstract(tensor, mesh, ()) for name, tensor in jittable.buffers.items()},
        [_abstract(tensor, mesh, input_layout(tuple(tensor.shape), mesh) if mesh else ()) for tensor in inputs.tensors],
    )
    layout = layouts[tuple(tuple(t.shape) for t in inputs.tensors)]
    outputs = [torch.empty(aval.shape, dtype=_torch_dtype(aval.dtype), device="meta") for aval in exported.out_avals]
    return ExportedCall(exported, layout.rebuild(outputs))


def _weight_specs(params: dict, mesh, rules: list) -> dict:
    if mesh is None:
        return {name: () for name in params}
    from tpu_ops.sharding import partition_specs

    return partition_specs({name: tuple(value.shape) for name, value in params.items()}, rules, dict(mesh.shape))


def _abstract(tensor: torch.Tensor, mesh, spec: tuple):
    """A tensor as a `jax.ShapeDtypeStruct` (placed by `spec` on `mesh`), in the dtype JAX computes in
    (int64 becomes int32 unless 64-bit mode is on, as when torchax moves a tensor)."""
    import jax
    from torchax.ops import mappings

    dtype = jax.dtypes.canonicalize_dtype(mappings.t2j_dtype(tensor.dtype))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)) if mesh is not None else None
    return jax.ShapeDtypeStruct(tuple(tensor.shape), dtype, sharding=sharding)


def _torch_dtype(dtype) -> torch.dtype:
    from torchax.ops import mappings

    return mappings.j2t_dtype(dtype)
