"""A request resolved against its model: family settings, the work items and their store keys."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from stagediff.backends import check_placement
from stagediff.confinement import check_location
from stagediff.errors import StagediffError
from stagediff.families import FamilyAdapter, Settings
from stagediff.models import Model, is_hub_id, open_model
from stagediff.request import Request
from stagediff.step_cache import resolve_cache
from stagediff.store import Store, content_key


@dataclass(frozen=True)
class Embedding:
    """One distinct (prompt, negative prompt): encoded once, shared by all its seeds."""

    prompt: str
    negative_prompt: str | None
    key: str
    inputs: dict
    path: str


@dataclass(frozen=True)
class Item:
    """One (prompt, seed): its latents and its media file."""

    embedding: Embedding
    seed: int
    latents_key: str
    latents_inputs: dict
    latents_path: str
    media_key: str
    media_path: str

    @property
    def prompt(self) -> str:
        return self.embedding.prompt


@dataclass(frozen=True)
class Plan:
    request: Request
    model: Model
    settings: Settings
    embeddings: tuple[Embedding, ...]
    items: tuple[Item, ...]
    model_fingerprints: dict[str, str]
    """Stage name → identity of the model components that stage loads."""

    @property
    def family(self) -> FamilyAdapter:
        return self.model.family

    @cached_property
    def store(self) -> Store:
        return Store(self.request.store)


def resolve_settings(request: Request, model: Model) -> Settings:
    """The family's defaults overridden by whatever the request sets."""
    family = model.family
    defaults = family.default_settings(model.model_index, model.config_of)
    chosen = {
        name: getattr(request, name)
        for name in ("steps", "guidance", "height", "width", "frames", "fps")
        if getattr(request, name) is not None
    }
    given = {name: value for name, value in request.extras.items() if value is not None}
    for name in given:
        if name not in defaults.extras:
            raise StagediffError(f"--{name.replace('_', '-')} is not an option of {family.name} models")
    extras = {**defaults.extras, **given}
    settings = defaults.replace(dtype=request.dtype, extras=extras, vae_tiling=request.vae_tiling,
                                cache=resolve_cache(request, model), **chosen)
    family.validate(settings, model.config_of)
    return settings


def make_plan(request: Request, model: Model | None = None) -> Plan:
    """Validate a request against its model and compute every artifact key, before any work."""
    check_location("--store", request.store)
    if not is_hub_id(request.model):
        check_location("--model", request.model)
    check_placement(request.backend, request.mesh)
    model = model or open_model(request.model)
    family = model.family
    settings = resolve_settings(request, model)
    if request.negative_prompt is not None and not family.uses_negative_prompt:
        raise StagediffError(f"--negative-prompt is not supported by {family.name} models (their pipeline takes none)")
    default_negative = request.negative_prompt if request.negative_prompt is not None else family.default_negative_prompt or None
    if not family.uses_negative_prompt and any(own is not None for _, own in request.prompt_pairs):
        raise StagediffError(f"negative prompts are not supported by {family.name} models (their pipeline takes none)")

    model.check_safetensors(family.encode_components + family.denoise_components + family.decode_components)
    encoders = model.fingerprint(family.encode_components)
    denoiser = model.fingerprint(family.denoise_components)
    decoder = model.fingerprint(family.decode_components)

    embeddings: dict[str, Embedding] = {}
    items = []
    for prompt, own_negative in request.prompt_pairs:
        negative = own_negative if own_negative is not None else default_negative
        inputs = {
            "family": family.name,
            "model": encoders,
            "prompt": prompt,
            "negative_prompt": negative,
            "dtype": settings.dtype,
            "encoder": family.encoder_settings(settings),
        }
        key = content_key(inputs)
        embedding = embeddings.setdefault(
            key, Embedding(prompt, negative, key, inputs, f"embeddings/{family.name}/{key}.safetensors")
        )
        for seed in dict.fromkeys(request.seeds):
            latents_inputs = {
                "embeddings": key,
                "model": denoiser,
                "seed": seed,
                "dtype": settings.dtype,
                "denoise": family.denoise_settings(settings),
            }
            latents_key = content_key(latents_inputs)
            media_key = content_key({"latents": latents_key, "model": decoder, "decode": family.decode_settings(settings)})
            items.append(
                Item(
                    embedding=embedding,
                    seed=seed,
                    latents_key=latents_key,
                    latents_inputs=latents_inputs,
                    latents_path=f"latents/{family.name}/{latents_key}.safetensors",
                    media_key=media_key,
                    media_path=f"media/{media_key}.{family.media_extension}",
                )
            )
    fingerprints = {"encode": encoders, "denoise": denoiser, "decode": decoder}
    return Plan(request, model, settings, tuple(embeddings.values()), tuple(items), fingerprints)
