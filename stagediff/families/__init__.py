"""Registry of model families, detected from a checkpoint's model_index.json."""

from __future__ import annotations

from stagediff.errors import StagediffError
from stagediff.families.base import Family, Settings
from stagediff.families.flux1 import Flux1
from stagediff.families.flux2 import Flux2, Flux2Klein
from stagediff.families.sdxl import SDXL
from stagediff.families.wan import Wan

FAMILIES: dict[str, Family] = {family.name: family for family in (SDXL(), Flux1(), Flux2(), Flux2Klein(), Wan())}


def family_for_pipeline(class_name: str, where: str) -> Family:
    """The family whose pipeline class is `class_name`, or a clear error naming it."""
    for family in FAMILIES.values():
        if class_name in family.pipeline_class_names:
            return family
    supported = ", ".join(name for family in FAMILIES.values() for name in family.pipeline_class_names)
    raise StagediffError(f"unsupported model family: pipeline class {class_name!r} in {where} (supported: {supported})")


__all__ = ["FAMILIES", "Family", "Settings", "family_for_pipeline"]
