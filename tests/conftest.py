"""Shared fixtures: tiny models of each family, built once per test session."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
if "STAGEDIFF_COMPILE_CACHE" not in os.environ:
    import tempfile

    os.environ["STAGEDIFF_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="stagediff-jax-cache-")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from stagediff.tiny import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """`tiny_models("sdxl")` -> folder of that family's tiny checkpoint, built once per session."""
    built: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("tiny-models")

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_model(family, root / family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_models) -> Path:
    return tiny_models("sdxl")
