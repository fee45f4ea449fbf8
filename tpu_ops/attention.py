"""Attention for the accelerator: a Pallas flash-attention kernel with exp2 softmax and K-smoothing.

- exp2: q is pre-scaled by log2(e)/sqrt(d), and the online softmax uses 2**x, which TPUs compute
  faster than e**x; the result is the same softmax.
- K-smoothing: subtracting K's mean over the sequence shifts every logit of a query row by the same
  amount, which softmax ignores, but it removes the large common offset real models' keys carry, so
  the low bits that bf16 keeps go to what differs between keys (lower bf16 error, measured in tests).

The kernel runs on TPU through Pallas (Mosaic) and anywhere with `interpret=True` (tests on CPU).
Sequences that are not multiples of the block sizes are padded, and padded keys are masked.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LOG2_E = math.log2(math.e)
MASKED = -1e30


@dataclass(frozen=True)
class AttentionConfig:
    """Kernel block lengths and when to split queries along the sequence.

    `block_q` queries meet `block_kv` keys per grid step, consumed `block_kv_compute` at a time
    (the reference's Wan 720p setting is 3328 / 2816 / 256). Query sequences of at least
    `sequence_parallel_from` tokens are split along the sequence over the mesh (context parallel)
    instead of splitting heads over `tp`.
    """

    block_q: int = 512
    block_kv: int = 512
    block_kv_compute: int = 512
    sequence_parallel_from: int = 32768


FAMILY_ATTENTION: dict[str, AttentionConfig] = {
    "wan": AttentionConfig(block_q=3328, block_kv=2816, block_kv_compute=256, sequence_parallel_from=16384),
}
"""Per-family settings; families not listed use `AttentionConfig()`."""


def reference_attention(q, k, v):
    """Plain softmax attention, `[batch, heads, seq, dim]`, computed in float32."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(logits, axis=-1), v)


def smooth_keys(k):
    """K minus its mean over the sequence."""
    return k - k.mean(axis=-2, keepdims=True)


def flash_attention(q, k, v, *, config: AttentionConfig = AttentionConfig(), exp2: bool = True,
                    k_smoothing: bool = True, interpret: bool = False):
    """Softmax attention of `[batch, heads, seq, dim]` arrays, blockwise with an online softmax, in
    q's dtype (K is smoothed in float32 first, then cast like V)."""
    if k_smoothing:
        k = smooth_keys(k.astype(jnp.float32))
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    batch, heads, q_len, dim = q.shape
    kv_len = k.shape[2]
    block_q = min(config.block_q, _round_up(q_len, 8))
    block_kv_compute = min(config.block_kv_compute, _round_up(kv_len, 8))
    block_kv = _round_up(min(config.block_kv, _round_up(kv_len, block_kv_compute)), block_kv_compute)
    q_padded, kv_padded = _round_up(q_len, block_q), _round_up(kv_len, block_kv)
    scale = (LOG2_E if exp2 else 1.0) / math.sqrt(dim)

    def flat(x, length):
        x = x.reshape(batch * heads, x.shape[2], dim)
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0)))

    kernel = functools.partial(_flash_kernel, block_kv=block_kv, block_kv_compute=block_kv_compute, kv_len=kv_len,
                               exp2=exp2, scale=scale)
    out = pl.pallas_call(
        kernel,
        grid=(batch * heads, q_padded // block_q, kv_padded // block_kv),
        in_specs=[
            pl.BlockSpec((None, block_q, dim), lambda bh, i, j: (bh, i, 0)),
            pl.BlockSpec((None, block_kv, dim), lambda bh, i, j: (bh, j, 0)),
            pl.BlockSpec((None, block_kv, dim), lambda bh, i, j: (bh, j, 0)),
        ],
        out_specs=pl.BlockSpec((None, block_q, dim), lambda bh, i, j: (bh, i, 0)),
        out_shape=jax.ShapeDtypeStruct((batch * heads, q_padded, dim), q.dtype),
        scratch_shapes=[
            pltpu.VMEM((block_q, 1), jnp.float32),  # running max
            pltpu.VMEM((block_q, 1), jnp.float32),  # softmax denominator
            pltpu.VMEM((block_q, dim), jnp.float32),  # unnormalised output
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(flat(q, q_padded), flat(k, kv_padded), flat(v, kv_padded))
    return out[:, :q_len].reshape(batch, heads, q_len, dim)


def _flash_kernel(q_ref, k_ref, v_ref, o_ref, max_ref, denominator_ref, accumulator_ref, *, block_kv: int,
                  block_kv_compute: int, kv_len: int, exp2: bool, scale: float):
    """One (head, query block, key block) grid step; the key blocks of a query block run in order
    and carry the online softmax in the scratch refs."""
    kv_block = pl.program_id(2)

    @pl.when(kv_block == 0)
    def _start():
        max_ref[...] = jnp.full(max_ref.shape, MASKED, jnp.float32)
        denominator_ref[...] = jnp.zeros(denominator_ref.shape, jnp.float32)
        accumulator_ref[...] = jnp.zeros(accumulator_ref.shape, jnp.float32)

    power = jnp.exp2 if exp2 else jnp.exp
    q = (q_ref[...] * scale).astype(q_ref.dtype)

    def step(index, carry):
        start = index * block_kv_compute
        k = k_ref[pl.ds(start, block_kv_compute), :]
        v = v_ref[pl.ds(start, block_kv_compute), :]
        logits = jnp.dot(q, k.T, preferred_element_type=jnp.float32)
        positions = kv_block * block_kv + start + lax.broadcasted_iota(jnp.int32, logits.shape, 1)
        logits = jnp.where(positions < kv_len, logits, MASKED)
        running_max = max_ref[...]
        new_max = jnp.maximum(running_max, logits.max(axis=-1, keepdims=True))
        weights = power(logits - new_max)
        correction = power(running_max - new_max)
        denominator_ref[...] = correction * denominator_ref[...] + weights.sum(axis=-1, keepdims=True)
        accumulator_ref[...] = correction * accumulator_ref[...] + jnp.dot(
            weights.astype(v.dtype), v, preferred_element_type=jnp.float32
        )
        max_ref[...] = new_max
        return carry

    lax.fori_loop(0, block_kv // block_kv_compute, step, 0)

    @pl.when(kv_block == pl.num_programs(2) - 1)
    def _finish():
        o_ref[...] = (accumulator_ref[...] / denominator_ref[...]).astype(o_ref.dtype)


def sharded_flash_attention(q, k, v, *, mesh=None, config: AttentionConfig = AttentionConfig(),
                            interpret: bool = False):
    """`flash_attention` on every device of `mesh` for its part of the work (a Pallas kernel is
    opaque to XLA's partitioner, so the split is explicit): the batch over `dp` where it divides,
    heads over `tp` for ordinary sequences, and the query sequence over every axis left (long
    sequences, `dp` when the batch is 1, `fsdp`), each device then attending to all keys."""
    kernel = functools.partial(flash_attention, config=config, interpret=interpret)
    if mesh is None or mesh.size == 1:
        return kernel(q, k, v)
    batch, heads, q_len, _ = q.shape
    batch_axis, heads_axis, sequence_axes = attention_layout(dict(mesh.shape), batch, heads, q_len, config)
    padding = _round_up(q_len, math.prod(dict(mesh.shape)[axis] for axis in sequence_axes)) - q_len
    if padding:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, padding), (0, 0)))
    P = jax.sharding.PartitionSpec
    q_spec = P(batch_axis, heads_axis, sequence_axes or None, None)
    kv_spec = P(batch_axis, heads_axis, None, None)
    out = jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                        check_vma=False)(q, k, v)
    return out[:, :, :q_len] if padding else out


def attention_layout(axis_sizes: dict[str, int], batch: int, heads: int, q_len: int, config: AttentionConfig):
    """(batch axis, heads axis, query-sequence axes) for one attention call on a mesh."""
    used = set()
    batch_axis = heads_axis = None
    if axis_sizes.get("dp", 1) > 1 and batch % axis_sizes["dp"] == 0:
        batch_axis = "dp"
        used.add("dp")
    tp = axis_sizes.get("tp", 1)
    if tp > 1 and q_len < config.sequence_parallel_from and heads % tp == 0:
        heads_axis = "tp"
        used.add("tp")
    sequence_axes = tuple(axis for axis, size in axis_sizes.items() if size > 1 and axis not in used)
    return batch_axis, heads_axis, sequence_axes


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


ATTENTION_VARIABLE = "STAGEDIFF_ATTENTION"
"""`flash` (default on TPU), `xla` (plain attention, default elsewhere) or `flash-interpret` (the
Pallas kernel interpreted, for tests on CPU)."""


def attention_mode() -> str:
    import os

    default = "flash" if jax.default_backend() == "tpu" else "xla"
    return os.environ.get(ATTENTION_VARIABLE, default)


@dataclass(frozen=True)
class AttentionPlacement:
    """What the flash kernel needs to know about the model being traced: its mesh and settings, and
    whether to use it at all (False after it failed to compile: plain attention then)."""

    mesh: object = None
    config: AttentionConfig = AttentionConfig()
    interpret: bool = False
    kernel: bool = True


_placement: contextvars.ContextVar[AttentionPlacement] = contextvars.ContextVar("attention_placement")


@contextlib.contextmanager
def placed_attention(placement: AttentionPlacement):
    """Trace the code inside with `placement` for every flash-attention call."""
    token = _placement.set(placement)
    try:
        yield
    finally:
        _placement.reset(token)


def install_flash_attention(env) -> None:
    """Make every `torch.nn.functional.scaled_dot_product_attention` that a torchax-compiled model
    calls run the flash kernel, placed as `placed_attention` says; calls it does not cover (masks,
    causal, dropout, custom scale) keep plain attention."""
    import torch
    from torchax.interop import call_jax

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        placement = _placement.get(AttentionPlacement())
        plain = attn_mask is not None or dropout_p or is_causal or enable_gqa or not placement.kernel
        if plain or (scale is not None and not math.isclose(scale, 1 / math.sqrt(query.shape[-1]))):
            logits = query @ key.transpose(-2, -1) * (scale or 1 / math.sqrt(query.shape[-1]))
            if attn_mask is not None:
                logits = logits + attn_mask if attn_mask.dtype != torch.bool else logits.masked_fill(~attn_mask, MASKED)
            if is_causal:
                causal = torch.ones(logits.shape[-2:], dtype=torch.bool).tril()
                logits = logits.masked_fill(~causal, MASKED)
            return torch.softmax(logits, dim=-1) @ value
        kernel = functools.partial(sharded_flash_attention, mesh=placement.mesh, config=placement.config,
                                   interpret=placement.interpret)
        return call_jax(kernel, query, key, value)

    env.override_op_definition(torch.nn.functional.scaled_dot_product_attention, sdpa)
