"""Each family's adapter (its numerics over the diffusers pipeline), by family name. Only the stages
use them: planning, keys and orchestration need the families alone (`stagediff.families`)."""

from __future__ import annotations

from stagediff.adapters.base import Adapter
from stagediff.adapters.flux1 import Flux1Adapter
from stagediff.adapters.flux2 import Flux2Adapter, Flux2KleinAdapter
from stagediff.adapters.sdxl import SDXLAdapter
from stagediff.adapters.wan import WanAdapter
from stagediff.families import Family

ADAPTERS: dict[str, Adapter] = {adapter.family.name: adapter for adapter in (
    SDXLAdapter(), Flux1Adapter(), Flux2Adapter(), Flux2KleinAdapter(), WanAdapter())}


def adapter_for(family: Family) -> Adapter:
    """The adapter of a family."""
    return ADAPTERS[family.name]


__all__ = ["ADAPTERS", "Adapter", "adapter_for"]
