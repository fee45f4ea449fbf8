"""A request resolved against its model: family settings, the work items and their store keys."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

from stagediff.cache_spec import resolve_cache
from stagediff.confinement import check_location
from stagediff.errors import StagediffError
from stagediff.families import Family, Settings
from stagediff.loras import AppliedLora, LoraFile, open_lora
from stagediff.models import Model, is_hub_id, open_model, pinned_reference
from stagediff.request import GRID_FIELDS, Request, values_of
from stagediff.scoring import open_scorers
from stagediff.store import Store, content_key

ENCODE, DENOISE, DECODE, SCORE = "encode", "denoise", "decode", "score"
STAGES = (ENCODE, DENOISE, DECODE)
"""The stages every run has; `score` follows decode where the request names scorers."""
FIXED_FIELDS = ("height", "width", "frames", "fps")
"""Request fields that take one value per run."""


@dataclass(frozen=True, eq=False)
class Point:
    """One combination of the swept values (the only one when nothing is swept): resolved settings and LoRA
    scales. Items of one point share a denoise batch."""

    settings: Settings
    lora_scales: tuple[tuple[str, float], ...]
    """Every LoRA source of the request with its scale here (0: not applied)."""
    loras: tuple[AppliedLora, ...]
    """The LoRAs applied, scale not 0, in the order given."""


@dataclass(frozen=True)
class Embedding:
    """One distinct (prompt, negative prompt, text-encoder LoRAs): encoded once, shared by all its seeds."""

    prompt: str
    negative_prompt: str | None
    key: str
    inputs: dict
    path: str
    settings: Settings
    loras: tuple[AppliedLora, ...] = ()
    """The LoRAs with text-encoder weights, applied by the encode stage."""
    entry: str | dict = ""
    """The prompt as the request gives it (a text, or the prompt with its own negative prompt)."""


@dataclass(frozen=True)
class Item:
    """One (prompt, seed) at one point of the grid: its latents and its media file."""

    embedding: Embedding
    seed: int
    latents_key: str
    latents_inputs: dict
    latents_path: str
    media_key: str
    media_path: str
    point: Point

    @property
    def prompt(self) -> str:
        return self.embedding.prompt

    @property
    def settings(self) -> Settings:
        return self.point.settings


@dataclass(frozen=True)
class Plan:
    request: Request
    model: Model
    points: tuple[Point, ...]
    embeddings: tuple[Embedding, ...]
    items: tuple[Item, ...]
    model_fingerprints: dict[str, str]
    """Stage name → identity of the model components that stage loads."""
    loras: tuple[LoraFile, ...] = ()
    scorers: tuple = ()
    """The request's scorers (`--score`: `stagediff.scoring.Scorer`), their files local and identities known."""

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages this batch runs: encode, denoise, decode, and score when it names scorers."""
        return STAGES + ((SCORE,) if self.request.scores else ())

    @property
    def family(self) -> Family:
        return self.model.family

    @cached_property
    def store(self) -> Store:
        return Store(self.request.store)


def resolve_points(request: Request, model: Model, loras: dict[str, LoraFile]) -> tuple[Point, ...]:
    """Every combination of the swept values (steps, guidance, family options, LoRA scales), each with the
    family's defaults filled in for what the request leaves out, and validated."""
    family = model.family
    defaults = family.default_settings(model.model_index, model.config_of)
    for name, value in request.extras.items():
        if value is not None and name not in defaults.extras:
            raise StagediffError(f"--{name.replace('_', '-')} is not an option of {family.name} models")
    fixed = {name: getattr(request, name) for name in FIXED_FIELDS if getattr(request, name) is not None}
    axes = {name: values_of(getattr(request, name)) for name in GRID_FIELDS}
    axes.update({name: values_of(value) for name, value in request.extras.items()})
    sources = [source for source, _ in request.lora_scales]
    cache = resolve_cache(request, model)
    points = []
    # LoRA scales vary slowest: each LoRA set is fused into a stage's pipeline once per run.
    for values in itertools.product(*(scales for _, scales in request.lora_scales), *axes.values()):
        chosen = {name: value for name, value in zip(axes, values[len(sources):]) if value is not None}
        extras = {**defaults.extras, **{name: chosen.pop(name) for name in request.extras if name in chosen}}
        settings = defaults.replace(dtype=request.dtype, extras=extras, vae_tiling=request.vae_tiling, cache=cache,
                                    **fixed, **chosen)
        family.validate(settings, model.config_of)
        scales = tuple(zip(sources, values[: len(sources)]))
        applied = tuple(AppliedLora(loras[source], scale) for source, scale in scales if scale != 0)
        points.append(Point(settings, scales, applied))
    return tuple(points)


def make_plan(request: Request, model: Model | None = None) -> Plan:
    """Validate a request against its model and compute every artifact key, before any work. What
    needs a device (backend, mesh, memory) is checked where a stage runs, when it loads."""
    check_location("--store", request.store)
    if not is_hub_id(request.model):
        check_location("--model", request.model)
    model = model or open_model(request.model)
    # One run, one revision: a Hub id is planned at the commit it resolves to now, and the request every
    # stage (and every remote worker) receives names that commit (`org/name@<commit>`).
    request = request.replace(model=pinned_reference(model)) if model.hub else request
    # A scorer that is not there fails the request now, before any work; a Hub scorer is pinned as the model is.
    scorers = open_scorers(request.scores)
    request = request.replace(scores=tuple(scorer.pinned for scorer in scorers)) if scorers else request
    family = model.family
    loras = {source: open_lora(source, model) for source, _ in request.lora_scales}
    points = resolve_points(request, model, loras)
    if request.negative_prompt is not None and not family.uses_negative_prompt:
        raise StagediffError(f"--negative-prompt is not supported by {family.name} models (their pipeline takes none)")
    default_negative = request.negative_prompt if request.negative_prompt is not None else family.default_negative_prompt or None
    if not family.uses_negative_prompt and any(own is not None for _, own in request.prompt_pairs):
        raise StagediffError(f"negative prompts are not supported by {family.name} models (their pipeline takes none)")

    model.check_safetensors(family.encode_components + family.denoise_components + family.decode_components)
    fingerprints = {"encode": model.fingerprint(family.encode_components),
                    "denoise": model.fingerprint(family.denoise_components),
                    "decode": model.fingerprint(family.decode_components)}
    embeddings: dict[str, Embedding] = {}
    items = []
    for prompt, own_negative in request.prompt_pairs:
        negative = own_negative if own_negative is not None else default_negative
        for point in points:
            embedding = _embedding(family, fingerprints["encode"], prompt, own_negative, negative, point)
            embedding = embeddings.setdefault(embedding.key, embedding)
            items += [_item(family, fingerprints, embedding, point, seed) for seed in dict.fromkeys(request.seeds)]
    return Plan(request, model, points, tuple(embeddings.values()), tuple(items), fingerprints,
                tuple(loras.values()), scorers)


def _embedding(family: Family, encoders: str, prompt: str, own_negative: str | None, negative: str | None,
               point: Point) -> Embedding:
    """The key chain's first link: embeddings keyed by the encoders' identity, the prompt pair, the dtype,
    the encoder settings and the LoRAs that change an encoder."""
    settings = point.settings
    encode_loras = tuple(lora for lora in point.loras if lora.changes(family.encode_components))
    inputs = {
        "family": family.name,
        "model": encoders,
        "prompt": prompt,
        "negative_prompt": negative,
        "dtype": settings.dtype,
        "encoder": family.encoder_settings(settings),
        **_lora_inputs(encode_loras),
    }
    key = content_key(inputs)
    entry = prompt if own_negative is None else {"prompt": prompt, "negative_prompt": own_negative}
    return Embedding(prompt, negative, key, inputs, f"embeddings/{family.name}/{key}.safetensors", settings,
                     encode_loras, entry)


def _item(family: Family, fingerprints: dict[str, str], embedding: Embedding, point: Point, seed: int) -> Item:
    """The next links: latents keyed by the embeddings' key, the denoiser's identity, the seed, the dtype,
    the denoise settings and the LoRAs that change the denoiser; media by the latents' key, the decoder's
    identity and the decode settings."""
    settings = point.settings
    denoise_loras = tuple(lora for lora in point.loras if lora.changes(family.denoise_components))
    latents_inputs = {
        "embeddings": embedding.key,
        "model": fingerprints["denoise"],
        "seed": seed,
        "dtype": settings.dtype,
        "denoise": family.denoise_settings(settings),
        **_lora_inputs(denoise_loras),
    }
    latents_key = content_key(latents_inputs)
    media_key = content_key({"latents": latents_key, "model": fingerprints["decode"],
                             "decode": family.decode_settings(settings)})
    return Item(
        embedding=embedding,
        seed=seed,
        latents_key=latents_key,
        latents_inputs=latents_inputs,
        latents_path=f"latents/{family.name}/{latents_key}.safetensors",
        media_key=media_key,
        media_path=f"media/{media_key}.{family.media_extension}",
        point=point,
    )


def _lora_inputs(loras: tuple[AppliedLora, ...]) -> dict:
    """The key inputs of the LoRAs a stage applies: none without LoRAs, so keys stay those of the base model."""
    return {"loras": [lora.key_entry() for lora in loras]} if loras else {}
