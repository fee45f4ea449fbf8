"""The three stages. Each reads its inputs from the store, computes only what is missing, writes
its artifacts, and returns their URIs. Each loads only its own pipeline components."""

from __future__ import annotations

import gc
import threading
import time
from dataclasses import dataclass, field

import torch

from stagediff import __version__, step_cache
from stagediff.backends import default_mesh, place_pipeline, resolve_backend
from stagediff.errors import CorruptArtifact, StagediffError
from stagediff.families import Settings
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


def _components_of(plan: Plan, stage: str) -> tuple[str, ...]:
    family = plan.family
    return {ENCODE: family.encode_components, DENOISE: family.denoise_components, DECODE: family.decode_components}[stage]


def _stage_pipeline(plan: Plan, stage: str, backend: str) -> tuple[_Loaded, float]:
    """The stage's pipeline (only its components loaded), kept for the next call with the same key."""
    mesh = plan.request.mesh
    if stage == DENOISE and mesh is None:
        mesh = default_mesh(backend, plan.request.batch_size, plan.model.folder / plan.family.denoiser_component)
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
        pipe = place_pipeline(pipe, "torch", None)
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
        compiles_before = len(loaded.compile_seconds)
        hits_before = compile_cache.stats.hits
        progress.stage_started(DENOISE, len(pending))
        batch_size = plan.request.batch_size
        for first in range(0, len(pending), batch_size):
            batch = pending[first : first + batch_size]
            start = time.perf_counter()
            latents = _denoise_batch(plan, loaded.pipe, backend, batch, embeddings, plan.settings, progress)
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
        result.compile_seconds = sum(loaded.compile_seconds[compiles_before:])
        result.compiles = len(loaded.compile_seconds) - compiles_before
        result.compile_cache_hits = compile_cache.stats.hits - hits_before
    result.computed = len(pending)
    return result


def denoise_in_memory(plan: Plan, items: list[Item], settings: Settings) -> torch.Tensor:
    """Denoise `items` in one call with `settings` (a variant of the plan's, e.g. a calibrating cache) and
    return their latents without storing them."""
    backend = resolve_backend(plan.request.backend)
    embeddings = {item.embedding.key: _read_embeddings(plan, item) for item in items}
    with _stage_locks[DENOISE]:
        loaded, _ = _stage_pipeline(plan, DENOISE, backend)
        return _denoise_batch(plan, loaded.pipe, backend, items, embeddings, settings, Progress())


def _denoise_batch(plan: Plan, pipe, backend: str, batch: list[Item], embeddings: dict, settings: Settings,
                   progress: Progress) -> torch.Tensor:
    generators = [torch.Generator("cpu").manual_seed(item.seed) for item in batch]
    with torch.no_grad(), step_cache.applied(pipe, plan.family.denoiser_component, settings, backend):
        return plan.family.denoise(
            pipe,
            [embeddings[item.embedding.key] for item in batch],
            generators,
            settings,
            on_step=lambda index, total: progress.step(DENOISE, index, total),
        )


def decode(plan: Plan, progress: Progress | None = None) -> StageResult:
    """Write one media file (PNG or MP4) per (prompt, seed) that lacks a valid one."""
    progress = progress or Progress()
    store = plan.store
    items = plan.items
    extension = plan.family.media_extension
    result = StageResult(DECODE, [store.uri_of(item.media_path) for item in items])
    pending = [item for item in items if not _has_valid_media(plan, item)]
    if not pending:
        return result
    with _stage_locks[DECODE]:
        loaded, result.load_seconds = _stage_pipeline(plan, DECODE, "torch")
        progress.stage_started(DECODE, len(pending))
        for item in pending:
            start = time.perf_counter()
            latents = _read_latents(plan, item)
            with torch.no_grad():
                frames = plan.family.decode(loaded.pipe, latents, plan.settings)
                data = media_bytes(extension, frames, plan.settings.fps, media_metadata(plan, item))
            uri = store.write_bytes(item.media_path, data)
            result.item_seconds.append(time.perf_counter() - start)
            progress.item_done(DECODE, uri)
        progress.stage_finished(DECODE)
    result.computed = len(pending)
    return result


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
    if settings.cache is not None:
        metadata["cache"] = settings.cache.settings
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
