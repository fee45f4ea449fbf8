"""Values coming back from the device to the host."""

from __future__ import annotations


def to_torch(value):
    """Bring a torchax tensor back as an ordinary CPU torch tensor; leave anything else alone."""
    import torchax.tensor

    if isinstance(value, torchax.tensor.Tensor):
        return value.torch()
    return value
