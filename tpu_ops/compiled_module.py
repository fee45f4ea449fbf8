"""Run a torch module's forward as one jax-jitted function through torchax.

`CompiledModule` stands in for the module inside a diffusers pipeline: it has the module's
attributes (config, dtype, ...) and call signature, takes and returns ordinary torch tensors, and
compiles its forward once per input signature (shapes, dtypes and the values of non-tensor
arguments). Arguments and results may be nested lists, tuples and dicts mixing tensors with other
values (None, strings, numbers): the tensors are the program's inputs and outputs, the rest is fixed
per compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
import time
from collections.abc import Callable

import torch
import torch.utils._pytree as pytree

from tpu_ops.attention import AttentionConfig, AttentionPlacement, attention_mode, install_flash_attention, placed_attention
from tpu_ops.host import to_torch

log = logging.getLogger(__name__)


class _TensorSlot:
    """Where a tensor sits among the fixed values of a flattened argument tree."""

    def __repr__(self):
        return "<tensor>"


TENSOR = _TensorSlot()


@dataclasses.dataclass(frozen=True)
class Flattened:
    """A tree of tensors and other values, split into its tensors and what is fixed about it."""

    tensors: list
    spec: pytree.TreeSpec
    fixed: tuple
    """The non-tensor leaves in order, `TENSOR` where a tensor goes."""

    @classmethod
    def of(cls, tree) -> "Flattened":
        leaves, spec = pytree.tree_flatten(tree)
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        return cls(tensors, spec, tuple(TENSOR if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves))

    @property
    def program_key(self) -> tuple:
        """What selects the traced program: the tree's layout and its fixed values (by repr: they may
        be unhashable, e.g. FLUX.1's `joint_attention_kwargs={}`)."""
        return (str(self.spec), repr(self.fixed))

    @property
    def signature(self) -> tuple:
        """The program key plus the tensors' shapes and dtypes: one compilation each."""
        return self.program_key + (_shapes(self.tensors),)

    def rebuild(self, tensors) -> object:
        tensors = iter(tensors)
        return pytree.tree_unflatten([next(tensors) if leaf is TENSOR else leaf for leaf in self.fixed], self.spec)


def _shapes(tensors) -> tuple:
    return tuple((tuple(t.shape), str(t.dtype)) for t in tensors)


def traceable_forward(jittable, inputs: Flattened, layouts: dict) -> Callable:
    """`f(params, buffers, tensors) -> output tensors` running the module on `inputs`' layout with
    `tensors` in the tensor slots. A jitted program returns only arrays: the layout and fixed values
    of its result are stored in `layouts`, by the input tensors' shapes (their dtypes may narrow in
    JAX: int64 becomes int32), when it is traced."""

    def forward(module, tensors):
        args, kwargs = inputs.rebuild(tensors)
        result = Flattened.of(module(*args, **kwargs))
        layouts[tuple(tuple(t.shape) for t in tensors)] = result
        return result.tensors

    return functools.partial(jittable.functional_call, forward)


def input_spec(shape: tuple[int, ...], mesh) -> tuple:
    """An input's partition spec on `mesh`: batch on `dp` where it divides, everything else replicated.
    Explicit input shardings keep XLA from guessing (unsharded torchax inputs made reference steps ~10x
    slower)."""
    dp = dict(mesh.shape).get("dp", 1)
    return ("dp",) if shape and dp > 1 and shape[0] % dp == 0 else ()


def image_input_spec(shape: tuple[int, ...], mesh) -> tuple:
    """For convolutional networks on images and videos (`[B, C, (T,) H, W]`): batch on `dp` where it
    divides, and the rows (or, where they do not divide, the columns) over every other axis, so that one
    large item keeps every device busy: XLA partitions the convolutions, exchanging the pixels at the
    shard edges. Other inputs as `input_spec`."""
    spec = list(input_spec(shape, mesh)) + [None] * (len(shape) - len(input_spec(shape, mesh)))
    axes = tuple(axis for axis, size in dict(mesh.shape).items() if size > 1 and axis not in spec)
    shards = math.prod(dict(mesh.shape)[axis] for axis in axes)
    if len(shape) >= 4 and axes:
        for dim in (-2, -1):
            if shape[dim] % shards == 0:
                spec[dim] = axes
                break
    return tuple(spec)


class CompiledModule:
    """A torch module whose forward runs as a jax-jitted function on the JAX default device."""

    def __init__(
        self,
        module: torch.nn.Module,
        on_compile: Callable[[float], None] | None = None,
        mesh=None,
        rules: list | None = None,
        attention: AttentionConfig = AttentionConfig(),
        input_layout: Callable[[tuple, object], tuple] = input_spec,
    ):
        """`mesh` (a jax Mesh) and `rules` (a sharding rule table) shard the weights over the devices,
        and `input_layout(shape, mesh)` gives each input tensor's partition spec; without a mesh the
        module runs on the JAX default device. `attention` sets the flash kernel's blocks when
        `STAGEDIFF_ATTENTION` selects it (the default on TPU)."""
        import torchax

        from tpu_ops import torchax_fixes
        from tpu_ops.compile_cache import enable_compile_cache

        enable_compile_cache()
        torchax_fixes.apply()
        self.env = torchax.default_env()
        mode = attention_mode()
        if mode.startswith("flash"):
            install_flash_attention(self.env)
        self.attention = AttentionPlacement(mesh, attention, interpret=mode == "flash-interpret",
                                            kernel=mode.startswith("flash"))
        self.module = module.eval()
        self.mesh = mesh
        self.input_layout = input_layout
        with self.env:
            self.module.to("jax")
        self.jittable = torchax.interop.JittableModule(self.module)
        if mesh is not None:
            self._shard_weights(rules or [])
        self.compiled_signatures: set = set()
        self._programs: dict = {}
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
        return self._call(args, kwargs, to_host=True)

    def call_on_device(self, *args, **kwargs):
        """Call the module, leaving the result's tensors on the JAX device(s) as torchax tensors: state
        that only feeds the next call (a decoder's feature cache) never travels to the host. The first
        call of a signature reports its tracing and compilation, not its (asynchronous) execution."""
        return self._call(args, kwargs, to_host=False)

    def _call(self, args: tuple, kwargs: dict, to_host: bool):
        inputs = Flattened.of((args, kwargs))
        first = inputs.signature not in self.compiled_signatures
        start = time.perf_counter()
        try:
            result = self._run(inputs)
        except Exception as error:
            if not (first and self.attention.kernel):
                raise
            self._fall_back_to_xla_attention(error)
            result = self._run(inputs)
        if to_host:
            result = pytree.tree_map(to_torch, result)
        self._record(inputs.signature, time.perf_counter() - start)
        return result

    def _run(self, inputs: Flattened):
        jitted, layouts = self._program_for(inputs)
        with self.env, placed_attention(self.attention):
            tensors = self.env.to_xla(inputs.tensors)
            if self.mesh is not None:
                tensors = [self._place_input(tensor) for tensor in tensors]
            results = jitted(self.jittable.params, self.jittable.buffers, tensors)
        return layouts[tuple(tuple(t.shape) for t in inputs.tensors)].rebuild(results)

    def _fall_back_to_xla_attention(self, error: Exception) -> None:
        """A flash kernel that does not compile here (a Mosaic or XLA:TPU error only a real TPU
        raises) must not fail the batch: log it once and trace again with plain XLA attention."""
        first_line = (str(error).strip().splitlines() or [""])[0]
        log.warning("flash attention failed to compile for %s (%s: %s); using XLA attention instead",
                    type(self.module).__name__, type(error).__name__, first_line[:300])
        self.attention = dataclasses.replace(self.attention, kernel=False)
        with self._lock:
            self._programs.clear()

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
        return self._put(value, self.input_layout(tuple(value.shape), self.mesh))

    def _program_for(self, inputs: Flattened) -> tuple[Callable, dict]:
        with self._lock:
            if inputs.program_key not in self._programs:
                import torchax

                layouts: dict = {}
                jitted = torchax.interop.jax_jit(traceable_forward(self.jittable, inputs, layouts))
                self._programs[inputs.program_key] = (jitted, layouts)
            return self._programs[inputs.program_key]

    def _record(self, signature, seconds: float) -> None:
        with self._lock:
            if signature in self.compiled_signatures:
                return
            self.compiled_signatures.add(signature)
        if self._on_compile is not None:
            self._on_compile(seconds)
