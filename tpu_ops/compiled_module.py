"""Run a torch module's forward as one jax-jitted function through torchax.

`CompiledModule` stands in for the module inside a diffusers pipeline: it has the module's
attributes (config, dtype, ...) and call signature, takes and returns ordinary torch tensors, and
compiles its forward once per input signature (shapes, dtypes and non-tensor arguments).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable

import torch
import torch.utils._pytree as pytree

from tpu_ops.attention import AttentionConfig, AttentionPlacement, attention_mode, install_flash_attention, placed_attention


def _is_tensor_tree(value) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))


def _signature(value):
    """A hashable description of one argument: shapes and dtypes of tensors, values of the rest."""
    leaves, spec = pytree.tree_flatten(value)
    described = tuple((tuple(leaf.shape), str(leaf.dtype)) if isinstance(leaf, torch.Tensor) else repr(leaf) for leaf in leaves)
    return (str(spec), described)


class CompiledModule:
    """A torch module whose forward runs as a jax-jitted function on the JAX default device."""

    def __init__(
        self,
        module: torch.nn.Module,
        on_compile: Callable[[float], None] | None = None,
        mesh=None,
        rules: list | None = None,
        attention: AttentionConfig = AttentionConfig(),
    ):
        """`mesh` (a jax Mesh) and `rules` (a sharding rule table) shard the weights over the devices;
        without a mesh the module runs on the JAX default device. `attention` sets the flash kernel's
        blocks when `STAGEDIFF_ATTENTION` selects it (the default on TPU)."""
        import torchax

        from tpu_ops.compile_cache import enable_compile_cache

        enable_compile_cache()
        self.env = torchax.default_env()
        mode = attention_mode()
        if mode.startswith("flash"):
            install_flash_attention(self.env)
        self.attention = AttentionPlacement(mesh, attention, interpret=mode == "flash-interpret")
        self.module = module.eval()
        self.mesh = mesh
        with self.env:
            self.module.to("jax")
        self.jittable = torchax.interop.JittableModule(self.module)
        if mesh is not None:
            self._shard_weights(rules or [])
        self.compiled_signatures: set = set()
        self._jitted: dict = {}
        self._on_compile = on_compile
        self._lock = threading.Lock()

    def __getattr__(self, name):
        # Only reached for attributes this wrapper lacks: config, dtype, add_embedding, ...
        return getattr(self.__dict__["module"], name)

    @property
    def compile_count(self) -> int:
        """How many distinct input signatures have been compiled so far."""
        return len(self.compiled_signatures)

    @functools.cached_property
    def regions(self):
        """This module run region by region, each region a compiled program (`tpu_ops.regions`), so that host
        code can decide between them; made on first use and kept."""
        from tpu_ops.regions import RegionCompiledModule

        return RegionCompiledModule(self)

    def __call__(self, *args, **kwargs):
        tensor_kwargs = {k: v for k, v in kwargs.items() if _is_tensor_tree(v)}
        static_kwargs = tuple(sorted((k, v) for k, v in kwargs.items() if k not in tensor_kwargs))
        for arg in args:
            if not _is_tensor_tree(arg):
                raise TypeError("CompiledModule takes tensors as positional arguments; pass other values by keyword")
        signature = (_signature(args), _signature(tensor_kwargs), repr(static_kwargs))
        jitted = self._jitted_for(static_kwargs, tuple(sorted(tensor_kwargs)))
        start = time.perf_counter()
        with self.env, placed_attention(self.attention):
            inputs = self.env.to_xla((args, tensor_kwargs))
            if self.mesh is not None:
                inputs = pytree.tree_map(self._place_input, inputs)
            outputs = jitted(self.jittable.params, self.jittable.buffers, *inputs)
            result = pytree.tree_map(_to_torch, outputs)
        self._record(signature, time.perf_counter() - start)
        return result

    def _shard_weights(self, rules: list) -> None:
        from tpu_ops.sharding import partition_specs

        axis_sizes = dict(self.mesh.shape)
        params = self.jittable.params
        specs = partition_specs({name: tuple(value.shape) for name, value in params.items()}, rules, axis_sizes)
        self.jittable.params = {name: self._put(value, specs[name]) for name, value in params.items()}
        self.jittable.buffers = {name: self._put(value, ()) for name, value in self.jittable.buffers.items()}

    def _put(self, tensor, spec: tuple):
        import jax
        from torchax.interop import jax_view, torch_view

        sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec))
        return torch_view(jax.device_put(jax_view(tensor), sharding))

    def _place_input(self, value):
        """Batch on `dp` where it divides, everything else replicated: explicit input shardings keep
        XLA from guessing (unsharded torchax inputs made reference steps ~10x slower)."""
        import torchax.tensor

        if not isinstance(value, torchax.tensor.Tensor):
            return value
        dp = dict(self.mesh.shape).get("dp", 1)
        batched = value.ndim > 0 and dp > 1 and value.shape[0] % dp == 0
        return self._put(value, ("dp",) if batched else ())

    def _jitted_for(self, static_kwargs: tuple, tensor_names: tuple) -> Callable:
        # By repr: static values may be unhashable (FLUX.1 passes `joint_attention_kwargs={}`).
        key = (repr(static_kwargs), tensor_names)
        with self._lock:
            if key not in self._jitted:
                import torchax

                def forward(module, args, tensor_kwargs):
                    return module(*args, **tensor_kwargs, **dict(static_kwargs))

                self._jitted[key] = torchax.interop.jax_jit(functools.partial(self.jittable.functional_call, forward))
            return self._jitted[key]

    def _record(self, signature, seconds: float) -> None:
        with self._lock:
            if signature in self.compiled_signatures:
                return
            self.compiled_signatures.add(signature)
        if self._on_compile is not None:
            self._on_compile(seconds)


def _to_torch(value):
    """Bring a torchax tensor back as an ordinary CPU torch tensor; leave anything else alone."""
    import torchax.tensor

    if isinstance(value, torchax.tensor.Tensor):
        return value.torch()
    return value
