"""Shared fixtures: tiny models of each family, built once per test session."""

from __future__ import annotations

import os

VIRTUAL_DEVICES = "--xla_force_host_platform_device_count"
if VIRTUAL_DEVICES not in os.environ.get("XLA_FLAGS", ""):
    # Added to whatever XLA_FLAGS already says: the mesh tests need 8 devices, and must not lose them
    # (or be skipped) because a user or CI sets other XLA flags.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {VIRTUAL_DEVICES}=8".strip()
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


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny random-init CLIP (the score stage's scorer), built once per session."""
    from stagediff.tiny.clip import build

    return build(tmp_path_factory.mktemp("tiny-clip") / "clip")


@pytest.fixture
def eight_devices():
    """For tests of meshes: fails (never skips) when JAX does not see 8 devices."""
    import jax

    assert jax.device_count() >= 8, f"JAX sees {jax.device_count()} devices; XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}"


@pytest.fixture(scope="session")
def emulator():
    """One fake-gcs-server for the session, with bucket `gcs_emulator.BUCKET`, and STORAGE_EMULATOR_HOST
    pointing at it."""
    from gcs_emulator import BUCKET, Emulator
    from stagediff import gcs

    server = Emulator()
    previous = os.environ.get(gcs.EMULATOR_VARIABLE)
    os.environ[gcs.EMULATOR_VARIABLE] = server.url
    gcs.filesystem().mkdir(BUCKET)
    yield server
    if previous is None:
        os.environ.pop(gcs.EMULATOR_VARIABLE)
    else:
        os.environ[gcs.EMULATOR_VARIABLE] = previous
    server.stop()


@pytest.fixture(scope="session")
def prefect_stack(tmp_path_factory, emulator):
    """`make serve`'s setup, shared by the real-server tests: a Prefect server, process workers on
    cpu-pool and tpu-pool, the deployments, and the warm stage workers (encode; one denoise+decode),
    with stage runs' parameters and results in a bucket, as on real infrastructure."""
    from flows.local_stack import LocalStack
    from gcs_emulator import BUCKET

    stack = LocalStack(tmp_path_factory.mktemp("prefect"), extra_env={"PREFECT_UI_ENABLED": "false"},
                       task_storage=f"gs://{BUCKET}/prefect-stage-runs")
    try:
        stack.start(accelerator_workers=1)
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def prefect_client(prefect_stack, monkeypatch):
    """A sync client of the shared server; flows called in the test process use that server and its
    task storage too (stage workers read the runs' parameters there)."""
    from prefect import settings
    from prefect.client.orchestration import get_client

    from flows.local_stack import TASK_STORAGE_SETTINGS

    updates = {name: prefect_stack.env[name] for name in ("PREFECT_API_URL", *TASK_STORAGE_SETTINGS)}
    for name, value in updates.items():
        monkeypatch.setenv(name, value)
    with settings.temporary_settings({getattr(settings, name): value for name, value in updates.items()}):
        with get_client(sync_client=True) as client:
            yield client


@pytest.fixture(scope="session")
def tiny_loras(tiny_models, tmp_path_factory):
    """`tiny_loras("sdxl")` -> a LoRA file for a tiny model, built once per session: `sdxl` (UNet and CLIP-L,
    diffusers' format), `sdxl-unet` (UNet only), `sdxl-kohya` (kohya's format), `flux1` (transformer only)."""
    import lora_files

    built: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("tiny-loras")
    builders = {
        "sdxl": lambda folder: lora_files.sdxl_lora(tiny_models("sdxl"), folder),
        "sdxl-unet": lambda folder: lora_files.sdxl_lora(tiny_models("sdxl"), folder, text_encoder=False),
        "sdxl-kohya": lambda folder: lora_files.sdxl_kohya_lora(tiny_models("sdxl"), folder / "kohya.safetensors"),
        "flux1": lambda folder: lora_files.flux_lora(tiny_models("flux1"), folder),
    }

    def get(name: str) -> Path:
        if name not in built:
            (root / name).mkdir()
            built[name] = builders[name](root / name)
        return built[name]

    return get
