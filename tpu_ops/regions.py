"""Regional compilation: a `CompiledModule`'s torch module run eagerly on the JAX device, with each region one
compiled program.

A single jitted forward cannot skip blocks on a decision made between them (a step cache's). Here the
module's own forward runs in Python on torchax tensors, so host code (diffusers' cache hooks on the
regions) decides between programs what to run, while tensors stay on the device from one region to the
next. The regions are the blocks of the module's block lists and each of its other direct children (the
embedders, the output norm and projection); only the forward's glue between them (concatenations, a
reshape) runs op by op. Regions of the same structure (all double-stream blocks, say) share one program,
compiled once per input signature and called with each region's own weights.
"""

from __future__ import annotations

import collections
import contextlib
import time

import torch
import torch.utils._pytree as pytree

from tpu_ops.attention import placed_attention
from tpu_ops.host import to_torch

_TENSOR = object()
"""Marks where the tensors go back among a call's flattened arguments."""


class RegionCompiledModule:
    """Calls like the module (torch tensors in and out); inside `installed()` its regions run as compiled
    programs, each region's weights (sharded as the CompiledModule placed them) passed in."""

    def __init__(self, compiled):
        self.compiled = compiled
        self.module = compiled.module
        self.regions = dict(_region_modules(self.module))
        state = _full_state(compiled.jittable)
        self._state = {name: _state_under(state, name) for name in self.regions}
        self._groups = {name: _structure(module, self._state[name]) for name, module in self.regions.items()}
        self._programs: dict = {}
        self.compiled_signatures: set = set()
        self.runs: collections.Counter = collections.Counter()
        """How many times each region's program ran (a skipped region does not run)."""

    def __getattr__(self, name):
        return getattr(self.__dict__["module"], name)

    @property
    def compile_count(self) -> int:
        return len(self.compiled_signatures)

    @contextlib.contextmanager
    def installed(self):
        """Each region's forward replaced by its compiled program while inside."""
        for name, module in self.regions.items():
            module.forward = _RegionCall(self, name)
        try:
            yield self
        finally:
            for module in self.regions.values():
                module.__dict__.pop("forward", None)

    def __call__(self, *args, **kwargs):
        import torchax.tensor

        compiled = self.compiled
        with compiled.env, placed_attention(compiled.attention):
            args, kwargs = compiled.env.to_xla((args, kwargs))
            if compiled.mesh is not None:
                args, kwargs = pytree.tree_map_only(torchax.tensor.Tensor, compiled._place_input, (args, kwargs))
            # Eager, with the placed (possibly sharded) weights in the module for the glue's own uses.
            outputs = compiled.jittable.functional_call(_call, compiled.jittable.params, compiled.jittable.buffers,
                                                        *args, **kwargs)
            return pytree.tree_map(to_torch, outputs)

    def run_region(self, name: str, args: tuple, kwargs: dict):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        if self.compiled.mesh is not None:
            # A cache's host code can hand a region tensors it made off the mesh (TaylorSeer's predicted
            # output lands on one device): put them back where the other inputs are.
            tensors = [self.compiled._place_input(tensor) for tensor in tensors]
        static = tuple(_TENSOR if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves)
        group = self._groups[name]
        program = self._program(name, group, spec, static)
        signature = (group, str(spec), repr(static), tuple((tuple(t.shape), str(t.dtype)) for t in tensors))
        start = time.perf_counter()
        outputs = program(self._state[name], tensors)
        self.runs[name] += 1
        if signature not in self.compiled_signatures:
            self.compiled_signatures.add(signature)
            if self.compiled._on_compile is not None:
                self.compiled._on_compile(time.perf_counter() - start)
        return outputs

    def _program(self, name: str, group, spec, static):
        # By repr: static values may be unhashable.
        key = (group, str(spec), repr(static))
        if key not in self._programs:
            import torchax

            # The first region of the group serves as the template; each call swaps its weights in.
            template = torchax.interop.JittableModule(self.regions[name])
            forward = type(self.regions[name]).forward

            def run(state, tensors):
                given = iter(tensors)
                args, kwargs = pytree.tree_unflatten([next(given) if s is _TENSOR else s for s in static], spec)
                return template.functional_call(forward, state, {}, *args, **kwargs)

            self._programs[key] = torchax.interop.jax_jit(run)
        return self._programs[key]


class _RegionCall:
    """Stands in for a region's forward."""

    def __init__(self, runner: RegionCompiledModule, name: str):
        self.runner, self.name = runner, name

    def __call__(self, *args, **kwargs):
        return self.runner.run_region(self.name, args, kwargs)


def _call(module, *args, **kwargs):
    return module(*args, **kwargs)


def _region_modules(module: torch.nn.Module):
    for name, child in module.named_children():
        if isinstance(child, torch.nn.ModuleList):
            for index, block in enumerate(child):
                yield f"{name}.{index}", block
        else:
            yield name, child


def _full_state(jittable) -> dict:
    """Parameters and buffers by name, weights shared under several names (deduplicated by torchax) under each."""
    state = {**jittable.params, **jittable.buffers}
    for kept, others in jittable._extra_dumped_weights.items():
        state.update({other: state[kept] for other in others})
    return state


def _state_under(state: dict, prefix: str) -> dict:
    return {name[len(prefix) + 1 :]: value for name, value in state.items() if name.startswith(prefix + ".")}


def _structure(module: torch.nn.Module, state: dict) -> tuple:
    """What decides whether two regions can share a program: class, configuration and weight shapes."""
    shapes = tuple(sorted((name, tuple(value.shape), str(value.dtype)) for name, value in state.items()))
    return (type(module).__qualname__, repr(module), shapes)
