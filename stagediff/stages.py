"""The three stages, as one stage runner that each stage configures. A stage run reads its inputs from
the store, computes only what is missing among the artifacts it was given (all of a plan's, or those of
some keys: one unit of the scheduler), writes its artifacts, and returns their URIs. Each stage loads
only its own pipeline components, and checks where it runs what needs a device (backend, mesh,
memory) before it writes anything."""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from stagediff import __version__, step_cache
from stagediff.adapters import Adapter, adapter_for
from stagediff.backends import (default_mesh, free_device_bytes, overlaps_stages, peak_growth, place_pipeline,
                                resolve_backend)
from stagediff.cache_spec import check_cache_backend
from stagediff.containers import LATENTS_CHECKSUM
from stagediff.devices import check_placement
from stagediff.decoding import choose_tile, decode_bytes, place_decoder, set_tiling, tiles_used, vae_input_shape
from stagediff.errors import CorruptArtifact, CorruptInput, StagediffError
from stagediff.families import Settings
from stagediff.inventory import DONE, Inventory
from stagediff.loras import AppliedLora, fuse_loras
from stagediff.media import media_bytes
from stagediff.plan import DECODE, DENOISE, ENCODE, SCORE, Embedding, Item, Plan
from stagediff.progress import Progress
from stagediff.request import AUTO
from stagediff.scheduler import LocalExecutor
from stagediff.scoring import ScoreTask, read_score, score_record, score_tasks
from stagediff.store import CHECKSUM_METADATA, Artifact
from tpu_ops import compile_cache

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
AUTO_BATCH_CAP = 8
"""The most items `--batch-size auto` puts in one call."""
MEMORY_MARGIN = 0.8
"""The share of the device's free memory that `--batch-size auto` plans to fill."""


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
    batch_sizes: list[int] = field(default_factory=list)
    """Items per call, in order."""


# -- loading ------------------------------------------------------------------------------------
@dataclass
class _Loaded:
    key: tuple
    pipe: object
    compile_seconds: list[float]
    mesh: str | None
    item_bytes: dict[tuple, int] = field(default_factory=dict)
    """What one item's call added to the device's memory at its peak, by output shape (`--batch-size auto`
    measures it once per loaded pipeline)."""


_loaded: dict[str, _Loaded] = {}
_stage_locks = {stage: threading.Lock() for stage in (ENCODE, DENOISE, DECODE, SCORE)}
_model_loading = threading.Lock()
"""One model load at a time per process: diffusers and accelerate load under process-wide patches of
torch (`init_empty_weights` swaps `nn.Module.register_parameter`, `no_init_weights` the `nn.init`
functions), so two loads at once in two threads leave torch patched for everything built later."""


def stage_backend(plan: Plan, stage: str) -> str:
    """Where a stage computes: encode and score with torch on the CPU, the others as the request's backend says."""
    if stage in (ENCODE, SCORE):
        return "torch"
    return resolve_backend(plan.request.backend)


def check_stage_placement(plan: Plan, stage: str) -> None:
    """What this machine must offer the stage (its backend, the mesh's devices, the step cache on that
    backend): a one-line error otherwise, before anything is loaded or written."""
    if stage in (ENCODE, SCORE):
        return
    backend = stage_backend(plan, stage)
    check_placement(backend, plan.request.mesh)
    cache = plan.points[0].settings.cache
    if stage == DENOISE and cache is not None:
        check_cache_backend(plan.request.cache, cache.method, backend)


def stage_pipeline(plan: Plan, stage: str, loras: Sequence[AppliedLora] = ()):
    """The stage's pipeline for this plan: only its components loaded, with the LoRAs fused that have
    weights for them, placed on its backend; kept loaded (one per stage) for the next call with the same
    model files, LoRAs, dtype, backend and mesh."""
    return _stage_pipeline(plan, stage, loras)[0].pipe


def _stage_pipeline(plan: Plan, stage: str, loras: Sequence[AppliedLora] = ()) -> tuple[_Loaded, float]:
    backend = stage_backend(plan, stage)
    family, adapter = plan.family, adapter_for(plan.family)
    components = family.components_of(stage)
    loras = tuple(lora for lora in loras if lora.changes(components))
    mesh = plan.request.mesh
    if stage != ENCODE and mesh is None:
        computed = family.denoiser_component if stage == DENOISE else "vae"
        batch_size = plan.request.batch_size if plan.request.batch_size != AUTO else AUTO_BATCH_CAP
        mesh = default_mesh(backend, batch_size, plan.model.folder / computed)
    # The fingerprint, not the folder: a checkpoint rewritten in place is loaded again.
    key = (str(plan.model.folder), plan.model.fingerprint(components), plan.request.dtype, backend, mesh,
           tuple((lora.file.digest, lora.scale) for lora in loras))
    loaded = _loaded.get(stage)
    if loaded is not None and loaded.key == key:
        return loaded, 0.0
    release(stage)
    start = time.perf_counter()
    pipe = _load_pipeline(plan, adapter, components, loras)
    pipe.set_progress_bar_config(disable=True)
    compile_seconds: list[float] = []
    if stage == DENOISE:
        pipe = place_pipeline(pipe, backend, family.denoiser_component, on_compile=compile_seconds.append,
                              mesh=mesh, family=family.name)
    elif stage == DECODE:
        pipe = place_decoder(pipe, backend, adapter.vae_dtype(pipe.vae), on_compile=compile_seconds.append, mesh=mesh)
    loaded = _Loaded(key, pipe, compile_seconds, mesh)
    _loaded[stage] = loaded
    return loaded, time.perf_counter() - start


def _load_pipeline(plan: Plan, adapter: Adapter, wanted: tuple[str, ...], loras: Sequence[AppliedLora] = ()):
    """The family's pipeline with only the `wanted` components loaded (safetensors weights only), the
    LoRAs fused into them."""
    plan.model.fetch(wanted)
    with _model_loading:
        _quiet_loading()
        own = adapter.own_components(plan.model.folder, wanted)
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


# -- the stage runner -----------------------------------------------------------------------------
class Stage(ABC):
    """One stage's part in the runner: what it produces, when one of its artifacts is done, how its
    pending artifacts group (each group loads the pipeline once) and batch, and how a batch is computed
    and written."""

    name: str

    @abstractmethod
    def artifacts(self, plan: Plan) -> Sequence[Embedding | Item]:
        """Every artifact of the plan this stage produces, in order."""

    @abstractmethod
    def key(self, artifact) -> str:
        """The key a scheduler's unit names the artifact by."""

    @abstractmethod
    def path(self, artifact) -> str:
        """The artifact's path in the store."""

    @abstractmethod
    def is_done(self, plan: Plan, artifact, inventory: Inventory) -> bool:
        """Whether the store holds the artifact, whole and current, as the inventory judges it (from
        listings and headers: bodies are read where they are consumed)."""

    def group(self, artifact) -> Hashable:
        """Artifacts of one group share the loaded pipeline (the same LoRAs, the same grid point)."""
        return artifact.point

    def loras(self, artifact) -> Sequence[AppliedLora]:
        return artifact.point.loras

    def load(self, plan: Plan, artifact) -> tuple[_Loaded, float]:
        """What computes the artifact's group, loaded (or kept from the last call), and the seconds it took."""
        return _stage_pipeline(plan, self.name, self.loras(artifact))

    def read_inputs(self, plan: Plan, pending: list) -> dict:
        """What the pending artifacts are computed from, read before any model is loaded (a missing
        input fails at once)."""
        return {}

    def batch_size(self, plan: Plan, loaded: _Loaded, group: list) -> int | None:
        """Items per call for this group (None: decide from the first call, `--batch-size auto`)."""
        return 1

    @abstractmethod
    def compute(self, plan: Plan, loaded: _Loaded, batch: list, inputs: dict, progress: Progress) -> Iterator[str]:
        """Compute and write a batch; yield each artifact's URI as it is written."""

    def run(self, plan: Plan, keys: Iterable[str] | None = None, progress: Progress | None = None) -> StageResult:
        """Write every missing artifact of the plan (or of those among `keys`); return all their URIs."""
        progress = progress or Progress()
        store = plan.store
        selected = self._select(plan, keys)
        result = StageResult(self.name, [store.uri_of(self.path(artifact)) for artifact in selected])
        inventory = Inventory(store)
        pending = [artifact for artifact in selected if not self.is_done(plan, artifact, inventory)]
        if not pending:
            return result
        check_stage_placement(plan, self.name)
        inputs = self.read_inputs(plan, pending)
        for folder in sorted({self.path(artifact).rsplit("/", 1)[0] for artifact in pending}):
            store.remove_leftovers(folder)
        with _stage_locks[self.name]:
            progress.stage_started(self.name, len(pending))
            for group in _grouped(pending, self.group):
                loaded, load_seconds = self.load(plan, group[0])
                result.load_seconds += load_seconds
                counting = _count_compiles(loaded, result)
                size = self.batch_size(plan, loaded, group)
                first = 0
                while first < len(group):
                    batch = group[first: first + (size or 1)]
                    start = time.perf_counter()
                    measuring = peak_growth(stage_backend(plan, self.name)) if size is None else contextlib.nullcontext([])
                    with measuring as peak:
                        for uri in self.compute(plan, loaded, batch, inputs, progress):
                            progress.item_done(self.name, uri)
                    seconds = (time.perf_counter() - start) / len(batch)
                    result.item_seconds.extend([seconds] * len(batch))
                    result.batch_sizes.append(len(batch))
                    first += len(batch)
                    if size is None:  # auto: the first call (one item) tells what an item costs
                        loaded.item_bytes[_shape(group[0])] = peak[0] if peak else 0
                        size = auto_batch_size(plan, self.name, loaded, loaded.item_bytes[_shape(group[0])])
                counting()
            progress.stage_finished(self.name)
        result.computed = len(pending)
        return result

    def _select(self, plan: Plan, keys: Iterable[str] | None) -> list:
        artifacts = list(self.artifacts(plan))
        if keys is None:
            return artifacts
        by_key: dict[str, list] = {}
        for artifact in artifacts:  # one key may name several artifacts (an item's scores)
            by_key.setdefault(self.key(artifact), []).append(artifact)
        wanted = list(dict.fromkeys(keys))
        unknown = [key for key in wanted if key not in by_key]
        if unknown:
            raise StagediffError(f"{self.name}: key {unknown[0]} is not one of this request's {self.name} artifacts "
                                 "(are the orchestrator and this worker on the same stagediff version?)")
        return [artifact for key in wanted for artifact in by_key[key]]


def auto_batch_size(plan: Plan, stage: str, loaded: _Loaded, item_bytes: int | None) -> int:
    """`--batch-size auto`: as many items as `MEMORY_MARGIN` of the device's free memory holds at
    `item_bytes` each (what one item's call added at its peak), up to `AUTO_BATCH_CAP`, a multiple of
    the mesh's `dp` where it has one; the cap where the device reports no memory use."""
    cache = plan.points[0].settings.cache
    if stage == DENOISE and cache is not None and cache.decides_per_call:
        return 1
    size = AUTO_BATCH_CAP
    if item_bytes:
        size = max(1, min(size, int(free_device_bytes(stage_backend(plan, stage)) * MEMORY_MARGIN // item_bytes)))
    dp = _dp_size(loaded.mesh)
    return size - size % dp if size >= dp else size


def _shape(item: Item) -> tuple:
    """What decides an item's memory on a loaded pipeline: its output's size."""
    settings = item.settings
    return settings.height, settings.width, settings.frames


def _dp_size(mesh: str | None) -> int:
    if not mesh:
        return 1
    from tpu_ops.mesh import parse_mesh_spec

    return parse_mesh_spec(mesh).get("dp", 1)


def _requested_batch(plan: Plan) -> int | None:
    """The request's `--batch-size`, or None for auto."""
    return None if plan.request.batch_size == AUTO else plan.request.batch_size


class EncodeStage(Stage):
    name = ENCODE

    def artifacts(self, plan):
        return plan.embeddings

    def key(self, embedding):
        return embedding.key

    def path(self, embedding):
        return embedding.path

    def is_done(self, plan, embedding, inventory):
        return inventory.tensors(embedding.path, embedding.key)[0] == DONE

    def group(self, embedding):
        return embedding.loras

    def loras(self, embedding):
        return embedding.loras

    def compute(self, plan, loaded, batch, inputs, progress):
        adapter = adapter_for(plan.family)
        for embedding in batch:
            with torch.no_grad():
                tensors = adapter.encode(loaded.pipe, embedding.prompt, embedding.negative_prompt, embedding.settings)
            yield plan.store.write_tensors(embedding.path, tensors, embedding.key, embedding.inputs)


class DenoiseStage(Stage):
    name = DENOISE

    def artifacts(self, plan):
        return plan.items

    def key(self, item):
        return item.latents_key

    def path(self, item):
        return item.latents_path

    def is_done(self, plan, item, inventory):
        return inventory.tensors(item.latents_path, item.latents_key)[0] == DONE

    def read_inputs(self, plan, pending):
        # Each needed embedding once.
        first_user = {item.embedding.key: item for item in reversed(pending)}
        return {key: _read_embeddings(plan, item) for key, item in first_user.items()}

    def batch_size(self, plan, loaded, group):
        requested = _requested_batch(plan)
        if requested is not None or _shape(group[0]) not in loaded.item_bytes:
            return requested
        return auto_batch_size(plan, DENOISE, loaded, loaded.item_bytes[_shape(group[0])])

    def compute(self, plan, loaded, batch, inputs, progress):
        latents = denoise_batch(plan, loaded.pipe, batch, inputs, batch[0].settings, progress)
        for index, item in enumerate(batch):
            yield plan.store.write_tensors(item.latents_path, {"latents": latents[index: index + 1]},
                                           item.latents_key, item.latents_inputs)


class DecodeStage(Stage):
    name = DECODE

    def artifacts(self, plan):
        return plan.items

    def key(self, item):
        return item.latents_key

    def path(self, item):
        return item.media_path

    def is_done(self, plan, item, inventory):
        checksum = inventory.tensors(item.latents_path, item.latents_key)[1]
        return inventory.media(item.media_path, checksum) == DONE

    def batch_size(self, plan, loaded, group):
        requested = _requested_batch(plan)
        if requested is not None:
            return requested
        # The decode's activations grow with the batch: one item's estimate sizes it.
        vae = loaded.pipe.vae
        item_bytes = decode_bytes(vae, vae_input_shape(vae, 1, group[0].settings), vae.dtype)
        return auto_batch_size(plan, DECODE, loaded, item_bytes)

    def compute(self, plan, loaded, batch, inputs, progress):
        adapter = adapter_for(plan.family)
        vae = loaded.pipe.vae
        settings = batch[0].settings
        latents = [_read_latents(plan, item) for item in batch]
        shape = vae_input_shape(vae, len(batch), settings)
        tile = choose_tile(vae, shape, settings.vae_tiling, free_device_bytes(stage_backend(plan, DECODE)))
        set_tiling(vae, tile)
        tiling = {"vae_tile": tile} if tiles_used(vae, shape, tile) else {}
        with torch.no_grad():
            chunks = adapter.decode(loaded.pipe, torch.cat([a.tensors["latents"] for a in latents]), settings)
            for item, artifact, frames in zip(batch, latents, _per_item(chunks, len(batch))):
                checksum = artifact.metadata[CHECKSUM_METADATA]
                metadata = {**media_metadata(plan, item), LATENTS_CHECKSUM: checksum, **tiling}
                data = media_bytes(plan.family.media_extension, frames, settings.fps, metadata)
                yield plan.store.write_bytes(item.media_path, data, {"latents-checksum": checksum})


SCORE_BATCH = 8
"""Media scored per call when `--batch-size` is auto."""


class ScoreStage(Stage):
    """Scores each item's media with each of the request's scorers; loads only the scorer (on the CPU,
    where encode runs), never the diffusion model."""

    name = SCORE

    def artifacts(self, plan):
        return score_tasks(plan)

    def key(self, task: ScoreTask):
        return task.item.latents_key

    def path(self, task: ScoreTask):
        return task.path

    def is_done(self, plan, task: ScoreTask, inventory):
        checksum = inventory.tensors(task.item.latents_path, task.item.latents_key)[1]
        return read_score(plan.store, task, checksum or "") is not None

    def group(self, task: ScoreTask):
        return task.scorer

    def loras(self, task: ScoreTask):
        return ()

    def load(self, plan, task: ScoreTask):
        from stagediff.scorers import load_scorer

        key = (SCORE, str(task.scorer.folder), task.scorer.identity)
        loaded = _loaded.get(SCORE)
        if loaded is not None and loaded.key == key:
            return loaded, 0.0
        release(SCORE)
        start = time.perf_counter()
        with _model_loading:
            _quiet_loading()
            loaded = _Loaded(key, load_scorer(task.scorer), [], None)
        _loaded[SCORE] = loaded
        return loaded, time.perf_counter() - start

    def batch_size(self, plan, loaded, group):
        return _requested_batch(plan) or SCORE_BATCH

    def compute(self, plan, loaded, batch, inputs, progress):
        from stagediff.scorers import media_frames

        store, extension = plan.store, plan.family.media_extension
        media = []
        for task in batch:
            try:
                media.append(media_frames(store.read_bytes(task.item.media_path), extension))
            except FileNotFoundError:
                raise StagediffError(f"media for prompt {task.item.prompt!r} seed {task.item.seed} is missing in "
                                     f"{store.uri}: run the decode stage first") from None
        values = loaded.pipe.scores(media, [task.item.prompt for task in batch])
        for task, value in zip(batch, values):
            record = score_record(task, value, store.uri_of(task.item.media_path), _latents_checksum(plan, task.item))
            yield store.write_json(task.path, record)


def _latents_checksum(plan: Plan, item: Item) -> str | None:
    """The checksum of the item's latents (from their header), which its current media was decoded from."""
    try:
        return plan.store.read_metadata(item.latents_path).get(CHECKSUM_METADATA)
    except (FileNotFoundError, CorruptArtifact):
        return None


STAGES: dict[str, Stage] = {stage.name: stage for stage in (EncodeStage(), DenoiseStage(), DecodeStage(), ScoreStage())}


def run_stage(stage: str, plan: Plan, keys: Iterable[str] | None = None, progress: Progress | None = None) -> StageResult:
    """Run one stage over the plan's artifacts, or those of `keys` (embeddings keys for encode, latents
    keys for denoise, decode and score)."""
    return STAGES[stage].run(plan, keys, progress)


def local_executor(plan: Plan, progress: Progress | None = None) -> LocalExecutor:
    """The executor that runs a plan's units in this process, overlapping encode with the accelerator's
    stages only where there is an accelerator. Every stage runs here: their placement is checked now,
    before any of them writes."""
    for stage in STAGES:
        check_stage_placement(plan, stage)
    return LocalExecutor(lambda unit: run_stage(unit.stage, plan, unit.keys, progress),
                         overlap=overlaps_stages(plan.request.backend))


def encode(plan: Plan, progress: Progress | None = None) -> StageResult:
    """Write one embeddings file per distinct (prompt, negative prompt) that lacks a valid one."""
    return run_stage(ENCODE, plan, progress=progress)


def denoise(plan: Plan, progress: Progress | None = None) -> StageResult:
    """Write one latents file per (prompt, seed) that lacks a valid one, batches of one grid point per call."""
    return run_stage(DENOISE, plan, progress=progress)


def decode(plan: Plan, progress: Progress | None = None) -> StageResult:
    """Write one media file (PNG or MP4) per (prompt, seed) that lacks a valid one, in tiles when
    `--vae-tiling` asks or the device's memory needs them."""
    return run_stage(DECODE, plan, progress=progress)


def denoise_in_memory(plan: Plan, items: list[Item], settings: Settings) -> torch.Tensor:
    """Denoise `items` in one call with `settings` (a variant of the plan's, e.g. a calibrating cache) and
    return their latents without storing them."""
    embeddings = {item.embedding.key: _read_embeddings(plan, item) for item in items}
    with _stage_locks[DENOISE]:
        loaded, _ = _stage_pipeline(plan, DENOISE, items[0].point.loras)
        return denoise_batch(plan, loaded.pipe, items, embeddings, settings, Progress())


def denoise_batch(plan: Plan, pipe, batch: list[Item], embeddings: dict, settings: Settings,
                  progress: Progress) -> torch.Tensor:
    """The latents of a batch of items, from their embeddings, in one call of the family's denoise."""
    adapter = adapter_for(plan.family)
    generators = [torch.Generator("cpu").manual_seed(item.seed) for item in batch]
    backend = stage_backend(plan, DENOISE)
    with torch.no_grad(), step_cache.applied(pipe, adapter, settings, backend):
        return adapter.denoise(
            pipe,
            [embeddings[item.embedding.key] for item in batch],
            generators,
            settings,
            on_step=lambda index, total: progress.step(DENOISE, index, total),
        )


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


def _grouped(pending: list, same) -> Iterable[list]:
    """The pending artifacts in groups that share `same(artifact)` (a grid point, LoRAs), in order of
    first appearance: each group loads its stage pipeline once."""
    groups: dict = {}
    for artifact in pending:
        groups.setdefault(same(artifact), []).append(artifact)
    return groups.values()


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
    return _read_input(plan, item.embedding.path, item.embedding.key, f"embeddings for prompt {item.prompt!r}",
                       "encode").tensors


def _read_latents(plan: Plan, item: Item) -> Artifact:
    return _read_input(plan, item.latents_path, item.latents_key,
                       f"latents for prompt {item.prompt!r} seed {item.seed}", "denoise")


def _read_input(plan: Plan, path: str, key: str, what: str, producer: str) -> Artifact:
    """An input artifact read and verified in full. A corrupt one is noted as such in the store (the
    inventory then counts it as corrupt, so the next schedule has `producer` write it again) and fails
    this stage with `CorruptInput`; this stage deletes nothing."""
    try:
        return plan.store.read_artifact(path, key)
    except FileNotFoundError:
        raise StagediffError(f"{what} are missing in {plan.store.uri}: run the {producer} stage first") from None
    except CorruptArtifact as error:
        plan.store.mark_corrupt(path, error)
        raise CorruptInput(f"{what} are corrupt in {plan.store.uri} ({error}): the {producer} stage writes them "
                           "again on the next run", path) from None
