"""The three stages. Each reads its inputs from the store, computes only what is missing, writes
its artifacts, and returns their URIs. Each loads only its own pipeline components."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from stagediff import __version__, step_cache
from stagediff.backends import default_mesh, free_device_bytes, place_pipeline, resolve_backend
from stagediff.decoding import choose_tile, place_decoder, set_tiling, tiles_used, vae_input_shape
from stagediff.errors import CorruptArtifact, StagediffError
from stagediff.families import Settings
from stagediff.loras import AppliedLora, fuse_loras
from stagediff.media import CorruptMedia, media_bytes, verified_media_metadata
from stagediff.plan import Item, Plan
from stagediff.progress import Progress
from stagediff.store import CHECKSUM_METADATA, Artifact
from tpu_ops import compile_cache

ENCODE, DENOISE, DECODE = "encode", "denoise", "decode"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LATENTS_CHECKSUM = "latents_checksum"
"""Media metadata: the checksum of the latents a media file was decoded from."""


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
_model_loading = threading.Lock()
"""One model load at a time per process: diffusers and accelerate load under process-wide patches of
torch (`init_empty_weights` swaps `nn.Module.register_parameter`, `no_init_weights` the `nn.init`
functions), so two loads at once in two threads leave torch patched for everything built later."""


_COMPUTED_COMPONENT = {DENOISE: lambda family: family.denoiser_component, DECODE: lambda family: "vae"}
"""The component whose weights size the default mesh of a stage on the accelerator."""


def _components_of(plan: Plan, stage: str) -> tuple[str, ...]:
    family = plan.family
    return {ENCODE: family.encode_components, DENOISE: family.denoise_components, DECODE: family.decode_components}[stage]


def stage_backend(plan: Plan, stage: str) -> str:
    """Where a stage computes: encode with torch on the CPU, the others as the request's backend says."""
    if stage == ENCODE:
        return "torch"
    return resolve_backend(plan.request.backend)


def stage_pipeline(plan: Plan, stage: str, loras: Sequence[AppliedLora] = ()):
    """The stage's pipeline for this plan: only its components loaded, with the LoRAs fused that have
    weights for them, placed on its backend; kept loaded (one per stage) for the next call with the same
    model files, LoRAs, dtype, backend and mesh."""
    return _stage_pipeline(plan, stage, loras)[0].pipe


def _stage_pipeline(plan: Plan, stage: str, loras: Sequence[AppliedLora] = ()) -> tuple[_Loaded, float]:
    backend = stage_backend(plan, stage)
    components = _components_of(plan, stage)
    loras = tuple(lora for lora in loras if lora.changes(components))
    mesh = plan.request.mesh
    if stage in _COMPUTED_COMPONENT and mesh is None:
        weights = plan.model.folder / _COMPUTED_COMPONENT[stage](plan.family)
        mesh = default_mesh(backend, plan.request.batch_size, weights)
    # The fingerprint, not the folder: a checkpoint rewritten in place is loaded again.
    key = (str(plan.model.folder), plan.model.fingerprint(components), plan.request.dtype, backend, mesh,
           tuple((lora.file.digest, lora.scale) for lora in loras))
    loaded = _loaded.get(stage)
    if loaded is not None and loaded.key == key:
        return loaded, 0.0
    release(stage)
    start = time.perf_counter()
    pipe = _load_pipeline(plan, components, loras)
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


def _load_pipeline(plan: Plan, wanted: tuple[str, ...], loras: Sequence[AppliedLora] = ()):
    """The family's pipeline with only the `wanted` components loaded (safetensors weights only), the
    LoRAs fused into them."""
    plan.model.fetch(wanted)
    with _model_loading:
        _quiet_loading()
        own = plan.family.own_components(plan.model.folder, wanted)
        skipped = {name: None for name in plan.model.components() if name not in wanted or name in own}
        pipe = plan.family.pipeline_class().from_pretrained(
            plan.model.folder, dtype=TORCH_DTYPES[plan.request.dtype], use_safetensors=True, **skipped
        )
        fuse_loras(pipe, plan.model, loras, wanted)
    if own:
        pipe.register_modules(**own)
    return pipe


def _quiet_loading() -> None:
    """No per-component loading bars: a stage reports its own progress (terminal bars, UI artifacts)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


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
    _remove_leftovers(store, [e.path for e in pending])
    with _stage_locks[ENCODE]:
        progress.stage_started(ENCODE, len(pending))
        for group in _grouped(pending, lambda embedding: embedding.loras):
            loaded, load_seconds = _stage_pipeline(plan, ENCODE, group[0].loras)
            result.load_seconds += load_seconds
            for embedding in group:
                start = time.perf_counter()
                with torch.no_grad():
                    tensors = plan.family.encode(loaded.pipe, embedding.prompt, embedding.negative_prompt,
                                                 embedding.settings)
                uri = store.write_tensors(embedding.path, tensors, embedding.key, embedding.inputs)
                result.item_seconds.append(time.perf_counter() - start)
                progress.item_done(ENCODE, uri)
        progress.stage_finished(ENCODE)
    result.computed = len(pending)
    return result


def denoise(plan: Plan, progress: Progress | None = None) -> StageResult:
    """Write one latents file per (prompt, seed) that lacks a valid one, `batch_size` items of one grid
    point per call."""
    progress = progress or Progress()
    store = plan.store
    items = plan.items
    result = StageResult(DENOISE, [store.uri_of(item.latents_path) for item in items])
    pending = [item for item in items if not store.has_valid_tensors(item.latents_path, item.latents_key)]
    if not pending:
        return result
    # Read each needed embedding once, before loading anything: a missing one fails fast.
    first_user = {item.embedding.key: item for item in reversed(pending)}
    embeddings = {key: _read_embeddings(plan, item) for key, item in first_user.items()}
    _remove_leftovers(store, [item.latents_path for item in pending])
    with _stage_locks[DENOISE]:
        progress.stage_started(DENOISE, len(pending))
        batch_size = plan.request.batch_size
        for group in _grouped(pending, lambda item: item.point):
            loaded, load_seconds = _stage_pipeline(plan, DENOISE, group[0].point.loras)
            result.load_seconds += load_seconds
            counting = _count_compiles(loaded, result)
            for first in range(0, len(group), batch_size):
                batch = group[first : first + batch_size]
                start = time.perf_counter()
                latents = _denoise_batch(plan, loaded.pipe, batch, embeddings, batch[0].settings, progress)
                for index, item in enumerate(batch):
                    uri = store.write_tensors(
                        item.latents_path, {"latents": latents[index : index + 1]}, item.latents_key, item.latents_inputs
                    )
                    progress.item_done(DENOISE, uri)
                seconds = (time.perf_counter() - start) / len(batch)
                result.item_seconds.extend([seconds] * len(batch))
            counting()
        progress.stage_finished(DENOISE)
    result.computed = len(pending)
    return result


def denoise_in_memory(plan: Plan, items: list[Item], settings: Settings) -> torch.Tensor:
    """Denoise `items` in one call with `settings` (a variant of the plan's, e.g. a calibrating cache) and
    return their latents without storing them."""
    embeddings = {item.embedding.key: _read_embeddings(plan, item) for item in items}
    with _stage_locks[DENOISE]:
        loaded, _ = _stage_pipeline(plan, DENOISE, items[0].point.loras)
        return _denoise_batch(plan, loaded.pipe, items, embeddings, settings, Progress())


def _denoise_batch(plan: Plan, pipe, batch: list[Item], embeddings: dict, settings: Settings,
                   progress: Progress) -> torch.Tensor:
    generators = [torch.Generator("cpu").manual_seed(item.seed) for item in batch]
    backend = stage_backend(plan, DENOISE)
    with torch.no_grad(), step_cache.applied(pipe, plan.family.denoiser_component, settings, backend):
        return plan.family.denoise(
            pipe,
            [embeddings[item.embedding.key] for item in batch],
            generators,
            settings,
            on_step=lambda index, total: progress.step(DENOISE, index, total),
        )


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
    _remove_leftovers(store, [item.media_path for item in pending])
    with _stage_locks[DECODE]:
        loaded, result.load_seconds = _stage_pipeline(plan, DECODE)
        counting = _count_compiles(loaded, result)
        progress.stage_started(DECODE, len(pending))
        vae = loaded.pipe.vae
        free_bytes = free_device_bytes(stage_backend(plan, DECODE))
        batch_size = plan.request.batch_size
        for group in _grouped(pending, lambda item: item.point):
            settings = group[0].settings
            for first in range(0, len(group), batch_size):
                batch = group[first : first + batch_size]
                start = time.perf_counter()
                latents = [_read_latents(plan, item) for item in batch]
                shape = vae_input_shape(vae, len(batch), settings)
                tile = choose_tile(vae, shape, settings.vae_tiling, free_bytes)
                set_tiling(vae, tile)
                tiling = {"vae_tile": tile} if tiles_used(vae, shape, tile) else {}
                with torch.no_grad():
                    chunks = plan.family.decode(loaded.pipe, torch.cat([a.tensors["latents"] for a in latents]), settings)
                    for item, artifact, frames in zip(batch, latents, _per_item(chunks, len(batch))):
                        checksum = artifact.metadata[CHECKSUM_METADATA]
                        metadata = {**media_metadata(plan, item), LATENTS_CHECKSUM: checksum, **tiling}
                        data = media_bytes(extension, frames, settings.fps, metadata)
                        uri = store.write_bytes(item.media_path, data, {"latents-checksum": checksum})
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
    """Start counting the compilations of one loaded pipeline's use; the returned function adds them to
    `result`."""
    compiles_before = len(loaded.compile_seconds)
    hits_before = compile_cache.stats.hits

    def finish() -> None:
        result.compile_seconds += sum(loaded.compile_seconds[compiles_before:])
        result.compiles += len(loaded.compile_seconds) - compiles_before
        result.compile_cache_hits += compile_cache.stats.hits - hits_before

    return finish


def _grouped(pending: list, same: Callable) -> Iterable[list]:
    """The pending artifacts in groups that share `same(artifact)` (a grid point, LoRAs), in order of
    first appearance: each group loads its stage pipeline once."""
    groups: dict = {}
    for artifact in pending:
        groups.setdefault(same(artifact), []).append(artifact)
    return groups.values()


def _remove_leftovers(store, paths: list[str]) -> None:
    """Delete what killed writers left in the folders this stage writes to."""
    for folder in sorted({path.rsplit("/", 1)[0] for path in paths}):
        store.remove_leftovers(folder)


def _has_valid_media(plan: Plan, item: Item) -> bool:
    """True when the media file decodes completely and was decoded from the latents the store holds now
    (latents recomputed since make it stale); a corrupt one is reported and counts as missing."""
    store = plan.store
    try:
        data = store.read_bytes(item.media_path)
        latents_checksum = store.read_metadata(item.latents_path).get(CHECKSUM_METADATA)
    except FileNotFoundError:
        return False
    except CorruptArtifact:
        return False  # the latents are recomputed, and this media file with them
    try:
        recorded = verified_media_metadata(plan.family.media_extension, data)
    except CorruptMedia as error:
        print(f"stagediff: corrupt media {store.uri_of(item.media_path)} ({error}); recomputing it")
        return False
    return recorded.get(LATENTS_CHECKSUM) == latents_checksum


def media_metadata(plan: Plan, item: Item) -> dict:
    """Generation metadata written into each media file."""
    settings = item.settings
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
    if item.point.loras:
        metadata["loras"] = [{"source": lora.file.source, "scale": lora.scale, "digest": lora.file.digest}
                             for lora in item.point.loras]
    return metadata


def _read_embeddings(plan: Plan, item: Item) -> dict[str, torch.Tensor]:
    try:
        return plan.store.read_tensors(item.embedding.path, item.embedding.key)
    except (FileNotFoundError, CorruptArtifact):
        raise StagediffError(
            f"embeddings for prompt {item.prompt!r} are missing or corrupt in {plan.store.uri}: run the encode stage first"
        ) from None


def _read_latents(plan: Plan, item: Item) -> Artifact:
    try:
        return plan.store.read_artifact(item.latents_path, item.latents_key)
    except (FileNotFoundError, CorruptArtifact):
        raise StagediffError(
            f"latents for prompt {item.prompt!r} seed {item.seed} are missing or corrupt in {plan.store.uri}: "
            "run the denoise stage first"
        ) from None
