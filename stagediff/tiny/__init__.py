"""Tiny random-init models of each family's real architecture, for tests and the demo."""

from __future__ import annotations

import importlib
from pathlib import Path

from stagediff.errors import StagediffError

BUILDERS = {
    "sdxl": "stagediff.tiny.sdxl",
}


def build_tiny_model(family: str, folder: Path) -> Path:
    """Build the tiny checkpoint of `family` into `folder` (diffusers layout with model_index.json)."""
    if family not in BUILDERS:
        raise StagediffError(f"unknown family {family!r} for tiny-model (choose from {', '.join(BUILDERS)})")
    module = importlib.import_module(BUILDERS[family])
    return module.build(Path(folder))
