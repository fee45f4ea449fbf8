"""Corrections to torchax behaviour that diffusers models run into, applied before tracing.

- `Tensor.type_as`: torchax 0.0.14 casts the wrapped array in place but keeps the tensor's torch dtype,
  so the next op sees a float32 tensor holding bf16 data and refuses it (AutoencoderKLWan's upsampling,
  `upsample(x.float()).type_as(x)`, fails in bf16). A plain `.to(other.dtype)` casts both.
"""

from __future__ import annotations


def apply() -> None:
    """Install the corrections (idempotent)."""
    import torchax.tensor

    torchax.tensor.Tensor.type_as = _type_as


def _type_as(self, other):
    return self.to(other.dtype)
