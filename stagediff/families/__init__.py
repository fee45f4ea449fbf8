"""Registry of model families, detected from a checkpoint's model_index.json."""

from __future__ import annotations

from stagediff.errors import StagediffError
from stagediff.families.base import FamilyAdapter, Settings
from stagediff.families.flux1 import Flux1
from stagediff.families.flux2 import Flux2, Flux2Klein
from stagediff.families.sdxl import SDXL
from stagediff.families.wan import Wan

FAMILIES: dict[str, FamilyAdapter] = {adapter.name: adapter for adapter in (SDXL(), Flux1(), Flux2(), Flux2Klein(), Wan())}


def family_for_pipeline(class_name: str, where: str) -> FamilyAdapter:
    """The family whose pipeline class is `class_name`, or a clear error naming it."""
    for adapter in FAMILIES.values():
        if class_name in adapter.pipeline_class_names:
            return adapter
    supported = ", ".join(name for adapter in FAMILIES.values() for name in adapter.pipeline_class_names)
    raise StagediffError(f"unsupported model family: pipeline class {class_name!r} in {where} (supported: {supported})")


__all__ = ["FAMILIES", "FamilyAdapter", "Settings", "family_for_pipeline"]
