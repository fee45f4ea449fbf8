"""The three stages. Each reads its inputs from the store, computes only what is missing, writes
its artifacts, and returns their URIs. Each loads only its own pipeline components."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from stagediff import __version__
from stagediff.backends import default_mesh, free_device_bytes, place_pipeline, resolve_backend
from stagediff.decoding import choose_tile, place_decoder, set_tiling, tiles_used, vae_input_shape
from stagediff.errors import CorruptArtifact, StagediffError
from stagediff.media import is_valid_media, media_bytes
from stagediff.plan import Item, Plan
from stagediff.progress import Progress
from tpu_ops import compile_cache

ENCODE, DENOISE, DECODE = "encode", "denoise", "decode"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class StageResult:
    """What a stage produced: the URIs of the selected artifacts and how long things took."""

    stage: str
    uris: list[str]
    computed: int = 0
    load_seconds: float = 0.0
    compile_seconds: float = 0.0
    compiles: int = 0
    compile_cache_hits: int = 0
    """Compilations answered by the persistent compile cache (torchax backend)."""
    item_seconds: list[float] = field(default_factory=list)


# -- loading ------------------------------------------------------------------------------------
@dataclass
class _Loaded:
    key: tuple
    pipe: object
    compile_seconds: list[float]


_loaded: dict[str, _Loaded] = {}
_stage_locks = {stage: threading.Lock() for stage in (ENCODE, DENOISE, DECODE)}


_COMPUTED_COMPONENT = {DENOISE: lambda family: family.denoiser_component, DECODE: lambda family: "vae"}
"""The component whose weights size the default mesh of a stage on the accelerator."""


def _components_of(plan: Plan, stage: str) -> tuple[str, ...]:
    family = plan.family
    return {ENCODE: family.encode_components, DENOISE: family.denoise_components, DECODE: family.decode_components}[stage]


def _stage_pipeline(plan: Plan, stage: str, backend: str) -> tuple[_Loaded, float]:
    """The stage's pipeline (only its components loaded), kept for the next call with the same key."""
    mesh = plan.request.mesh
    if stage in _COMPUTED_COMPONENT and mesh is None:
        weights = plan.model.folder / _COMPUTED_COMPONENT[stage](plan.family)
        mesh = default_mesh(backend, plan.request.batch_size, weights)
    key = (str(plan.model.folder), plan.settings.dtype, backend, mesh)
    loaded = _loaded.get(stage)
    if loaded is not None and loaded.key == key:
        return loaded, 0.0
    release(stage)
    start = time.perf_counter()
    wanted = _components_of(plan, stage)
    own = plan.family.own_components(plan.model.folder, wanted)
    skipped = {name: None for name in plan.model.components() if name not in wanted or name in own}
    pipe = plan.family.pipeline_class().from_pretrained(
        plan.model.folder, dtype=TORCH_DTYPES[plan.settings.dtype], **skipped
    )
    if own:
        pipe.register_modules(**own)
    pipe.set_progress_bar_config(disable=True)
    compile_seconds: list[float] = []
    if stage == DENOISE:
        pipe = place_pipeline(
            pipe, backend, plan.family.denoiser_component, on_compile=compile_seconds.append,
            mesh=mesh, family=plan.family.name,
        )
    elif stage == DECODE:
        pipe = place_decoder(pipe, backend, plan.family.vae_dtype(pipe.vae), on_compile=compile_seconds.append,
                             mesh=mesh)
    loaded = _Loaded(key, pipe, compile_seconds)
    _loaded[stage] = loaded
    return loaded, time.perf_counter() - start


def loaded_components(stage: str) -> tuple[str, ...]:
    """Names of the pipeline components the stage currently holds in memory."""
    loaded = _loaded.get(stage)
    if loaded is None:
        return ()
    return tuple(sorted(name for name, value in loaded.pipe.components.items() if value is not None))


def release(stage: str | None = None) -> None:
    """Drop the cached pipeline of one stage (or all), so its memory is freed."""
    dropped = [_loaded.pop(name) for name in ([stage] if stage else list(_loaded)) if name in _loaded]
    if dropped:
        del dropped
        gc.collect()  # pipelines hold reference cycles; free their weights now, not at some later GC


# -- stages -------------------------------------------------------------------------------------
def encode(plan: Plan, progress: Progress | None = None) -> StageResult:
    """Write one embeddings file per distinct (prompt, negative prompt) that lacks a valid one."""
    progress = progress or Progress()
    store = plan.store
    embeddings = plan.embeddings
    result = StageResult(ENCODE, [store.uri_of(e.path) for e in embeddings])
    pending = [e for e in embeddings if not store.has_valid_tensors(e.path, e.key)]
    if not pending:
        return result
    with _stage_locks[ENCODE]:
        loaded, result.load_seconds = _stage_pipeline(plan, ENCODE, "torch")
        progress.stage_started(ENCODE, len(pending))
        for embedding in pending:
            start = time.perf_counter()
            with torch.no_grad():
                tensors = plan.family.encode(loaded.pipe, embedding.prompt, embedding.negative_prompt, plan.settings)
            uri = store.write_tensors(embedding.path, tensors, embedding.key, embedding.inputs)
            result.item_seconds.append(time.perf_counter() - start)
            progress.item_done(ENCODE, uri)
        progress.stage_finished(ENCODE)
    result.computed = len(pending)
    return result


def denoise(plan: Plan, progress: Progress | None = None) -> StageResult:
    """Write one latents file per (prompt, seed) that lacks a valid one, `batch_size` items per call."""
    progress = progress or Progress()
    store = plan.store
    items = plan.items
    result = StageResult(DENOISE, [store.uri_of(item.latents_path) for item in items])
    pending = [item for item in items if not store.has_valid_tensors(item.latents_path, item.latents_key)]
    if not pending:
        return result
    backend = resolve_backend(plan.request.backend)
    # Read each needed embedding once, before loading anything: a missing one fails fast.
    first_user = {item.embedding.key: item for item in reversed(pending)}
    embeddings = {key: _read_embeddings(plan, item) for key, item in first_user.items()}
    with _stage_locks[DENOISE]:
        loaded, result.load_seconds = _stage_pipeline(plan, DENOISE, backend)
        counting = _count_compiles(loaded, result)
        progress.stage_started(DENOISE, len(pending))
        batch_size = plan.request.batch_size
        for first in range(0, len(pending), batch_size):
            batch = pending[first : first + batch_size]
            start = time.perf_counter()
            generators = [torch.Generator("cpu").manual_seed(item.seed) for item in batch]
            with torch.no_grad():
                latents = plan.family.denoise(
                    loaded.pipe,
                    [embeddings[item.embedding.key] for item in batch],
                    generators,
                    plan.settings,
                    on_step=lambda index, total: progress.step(DENOISE, index, total),
                )
            for index, item in enumerate(batch):
                uri = store.write_tensors(
                    item.latents_path, {"latents": latents[index : index + 1]}, item.latents_key, item.latents_inputs
                )
                # Media decoded from the latents this replaces is stale now: decode redoes it.
                store.remove(item.media_path)
                progress.item_done(DENOISE, uri)
            seconds = (time.perf_counter() - start) / len(batch)
            result.item_seconds.extend([seconds] * len(batch))
        progress.stage_finished(DENOISE)
        counting()
    result.computed = len(pending)
    return result


def decode(plan: Plan, progress: Progress | None = None) -> StageResult:
    """Write one media file (PNG or MP4) per (prompt, seed) that lacks a valid one, `batch_size` items
    per call, in tiles when `--vae-tiling` asks or the device's memory needs them."""
    progress = progress or Progress()
    store = plan.store
    items = plan.items
    extension = plan.family.media_extension
    result = StageResult(DECODE, [store.uri_of(item.media_path) for item in items])
    pending = [item for item in items if not _has_valid_media(plan, item)]
    if not pending:
        return result
    backend = resolve_backend(plan.request.backend)
    with _stage_locks[DECODE]:
        loaded, result.load_seconds = _stage_pipeline(plan, DECODE, backend)
        counting = _count_compiles(loaded, result)
        progress.stage_started(DECODE, len(pending))
        vae = loaded.pipe.vae
        batch_size = plan.request.batch_size
        for first in range(0, len(pending), batch_size):
            batch = pending[first : first + batch_size]
            start = time.perf_counter()
            latents = torch.cat([_read_latents(plan, item) for item in batch])
            shape = vae_input_shape(vae, len(batch), plan.settings)
            tile = choose_tile(vae, shape, plan.settings.vae_tiling, free_device_bytes(backend))
            set_tiling(vae, tile)
            tiling = {"vae_tile": tile} if tiles_used(vae, shape, tile) else {}
            with torch.no_grad():
                chunks = plan.family.decode(loaded.pipe, latents, plan.settings)
                for item, frames in zip(batch, _per_item(chunks, len(batch))):
                    metadata = {**media_metadata(plan, item), **tiling}
                    uri = store.write_bytes(item.media_path, media_bytes(extension, frames, plan.settings.fps, metadata))
                    progress.item_done(DECODE, uri)
            seconds = (time.perf_counter() - start) / len(batch)
            result.item_seconds.extend([seconds] * len(batch))
        progress.stage_finished(DECODE)
        counting()
    result.computed = len(pending)
    return result


def _per_item(chunks: Iterator[np.ndarray], batch: int) -> list[Iterable[np.ndarray]]:
    """Split decoded chunks `[B, f, H, W, 3]` into each item's chunks `[f, H, W, 3]`: streamed for one
    item (a video goes to its encoder frame by frame), gathered for a batch."""
    if batch == 1:
        return [(chunk[0] for chunk in chunks)]
    gathered = list(chunks)
    return [[chunk[index] for chunk in gathered] for index in range(batch)]


def _count_compiles(loaded: _Loaded, result: StageResult):
    """Start counting the compilations of a stage call; the returned function writes them to `result`."""
    compiles_before = len(loaded.compile_seconds)
    hits_before = compile_cache.stats.hits

    def finish() -> None:
        result.compile_seconds = sum(loaded.compile_seconds[compiles_before:])
        result.compiles = len(loaded.compile_seconds) - compiles_before
        result.compile_cache_hits = compile_cache.stats.hits - hits_before

    return finish


def missing_stages(plan: Plan) -> list[str]:
    """The stages that still have work for this plan, judged from the store alone (no model loaded)."""
    store = plan.store
    missing_latents = [item for item in plan.items if not store.has_valid_tensors(item.latents_path, item.latents_key)]
    needed = []
    if missing_latents and any(
        not store.has_valid_tensors(e.path, e.key)
        for e in {item.embedding.key: item.embedding for item in missing_latents}.values()
    ):
        needed.append(ENCODE)
    if missing_latents:
        needed.append(DENOISE)
    if missing_latents or not all(_has_valid_media(plan, item) for item in plan.items):
        needed.append(DECODE)
    return needed


def _has_valid_media(plan: Plan, item: Item) -> bool:
    store = plan.store
    return store.exists(item.media_path) and is_valid_media(plan.family.media_extension, store.read_bytes(item.media_path))


def media_metadata(plan: Plan, item: Item) -> dict:
    """Generation metadata written into each media file."""
    settings = plan.settings
    metadata = {
        "prompt": item.prompt,
        "negative_prompt": item.embedding.negative_prompt,
        "seed": item.seed,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "height": settings.height,
        "width": settings.width,
        "model": plan.request.model,
        "family": plan.family.name,
        "dtype": settings.dtype,
        "latents_key": item.latents_key,
        "stagediff_version": __version__,
    }
    if settings.frames is not None:
        metadata.update(frames=settings.frames, fps=settings.fps)
    metadata.update(settings.extras)
    return metadata


def _read_embeddings(plan: Plan, item: Item) -> dict[str, torch.Tensor]:
    try:
        return plan.store.read_tensors(item.embedding.path, item.embedding.key)
    except (FileNotFoundError, CorruptArtifact):
        raise StagediffError(
            f"embeddings for prompt {item.prompt!r} are missing or corrupt in {plan.store.uri}: run the encode stage first"
        ) from None


def _read_latents(plan: Plan, item: Item) -> torch.Tensor:
    try:
        return plan.store.read_tensors(item.latents_path, item.latents_key)["latents"]
    except (FileNotFoundError, CorruptArtifact):
        raise StagediffError(
            f"latents for prompt {item.prompt!r} seed {item.seed} are missing or corrupt in {plan.store.uri}: "
            "run the denoise stage first"
        ) from None
