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

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

LOG2_E = math.log2(math.e)
MASKED = -1e30


@dataclass(frozen=True)
class AttentionBlocks:
    """Query and key/value block lengths (the reference's Wan 720p setting is 3328 / 2816)."""

    block_q: int = 512
    block_kv: int = 512


def reference_attention(q, k, v):
    """Plain softmax attention, `[batch, heads, seq, dim]`, computed in float32."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(logits, axis=-1), v)


def smooth_keys(k):
    """K minus its mean over the sequence."""
    return k - k.mean(axis=-2, keepdims=True)


def flash_attention(q, k, v, *, blocks: AttentionBlocks = AttentionBlocks(), exp2: bool = True,
                    k_smoothing: bool = True, interpret: bool = False):
    """Softmax attention of `[batch, heads, seq, dim]` arrays, blockwise with an online softmax, in
    q's dtype (K is smoothed in float32 first, then cast like V)."""
    if k_smoothing:
        k = smooth_keys(k.astype(jnp.float32))
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    batch, heads, q_len, dim = q.shape
    kv_len = k.shape[2]
    block_q = min(blocks.block_q, _round_up(q_len, 8))
    block_kv = min(blocks.block_kv, _round_up(kv_len, 8))
    q_padded, kv_padded = _round_up(q_len, block_q), _round_up(kv_len, block_kv)
    scale = (LOG2_E if exp2 else 1.0) / math.sqrt(dim)

    def flat(x, length):
        x = x.reshape(batch * heads, x.shape[2], dim)
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0)))

    kernel = functools.partial(_flash_kernel, block_kv=block_kv, kv_len=kv_len, exp2=exp2, scale=scale)
    out = pl.pallas_call(
        kernel,
        grid=(batch * heads, q_padded // block_q),
        in_specs=[
            pl.BlockSpec((None, block_q, dim), lambda bh, i: (bh, i, 0)),
            pl.BlockSpec((None, kv_padded, dim), lambda bh, i: (bh, 0, 0)),
            pl.BlockSpec((None, kv_padded, dim), lambda bh, i: (bh, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, block_q, dim), lambda bh, i: (bh, i, 0)),
        out_shape=jax.ShapeDtypeStruct((batch * heads, q_padded, dim), q.dtype),
        interpret=interpret,
    )(flat(q, q_padded), flat(k, kv_padded), flat(v, kv_padded))
    return out[:, :q_len].reshape(batch, heads, q_len, dim)


def _flash_kernel(q_ref, k_ref, v_ref, o_ref, *, block_kv: int, kv_len: int, exp2: bool, scale: float):
    power = jnp.exp2 if exp2 else jnp.exp
    q = (q_ref[...] * scale).astype(q_ref.dtype)
    block_q, dim = q.shape

    def step(index, carry):
        running_max, denominator, accumulator = carry
        start = index * block_kv
        k = k_ref[pl.ds(start, block_kv), :]
        v = v_ref[pl.ds(start, block_kv), :]
        logits = jnp.dot(q, k.T, preferred_element_type=jnp.float32)
        positions = start + lax.broadcasted_iota(jnp.int32, logits.shape, 1)
        logits = jnp.where(positions < kv_len, logits, MASKED)
        new_max = jnp.maximum(running_max, logits.max(axis=-1))
        weights = power(logits - new_max[:, None])
        correction = power(running_max - new_max)
        denominator = correction * denominator + weights.sum(axis=-1)
        accumulator = correction[:, None] * accumulator + jnp.dot(
            weights.astype(v.dtype), v, preferred_element_type=jnp.float32
        )
        return new_max, denominator, accumulator

    initial = (
        jnp.full((block_q,), MASKED, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
        jnp.zeros((block_q, dim), jnp.float32),
    )
    _, denominator, accumulator = lax.fori_loop(0, k_ref.shape[0] // block_kv, step, initial)
    o_ref[...] = (accumulator / denominator[:, None]).astype(o_ref.dtype)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


ATTENTION_VARIABLE = "STAGEDIFF_ATTENTION"
"""`flash` (default on TPU), `xla` (plain attention, default elsewhere) or `flash-interpret` (the
Pallas kernel interpreted, for tests on CPU)."""


def attention_mode() -> str:
    import os

    default = "flash" if jax.default_backend() == "tpu" else "xla"
    return os.environ.get(ATTENTION_VARIABLE, default)


def install_flash_attention(env, blocks: AttentionBlocks = AttentionBlocks(), interpret: bool = False) -> None:
    """Make every `torch.nn.functional.scaled_dot_product_attention` that a torchax-compiled model
    calls run the flash kernel; calls it does not cover (masks, causal, dropout, custom scale) keep
    plain attention."""
    import torch
    from torchax.interop import call_jax

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        plain = attn_mask is not None or dropout_p or is_causal or enable_gqa
        if plain or (scale is not None and not math.isclose(scale, 1 / math.sqrt(query.shape[-1]))):
            logits = query @ key.transpose(-2, -1) * (scale or 1 / math.sqrt(query.shape[-1]))
            if attn_mask is not None:
                logits = logits + attn_mask if attn_mask.dtype != torch.bool else logits.masked_fill(~attn_mask, MASKED)
            if is_causal:
                causal = torch.ones(logits.shape[-2:], dtype=torch.bool).tril()
                logits = logits.masked_fill(~causal, MASKED)
            return torch.softmax(logits, dim=-1) @ value
        kernel = functools.partial(flash_attention, blocks=blocks, interpret=interpret)
        return call_jax(kernel, query, key, value)

    env.override_op_definition(torch.nn.functional.scaled_dot_product_attention, sdpa)
