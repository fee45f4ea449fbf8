"""The run manifest: which artifacts belong to which (prompt, seed)."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from stagediff.confinement import check_location, check_run_name
from stagediff.errors import StagediffError, one_line
from stagediff.families import Settings
from stagediff.plan import Plan
from stagediff.scoring import SCORE_FILES, SCORES_FOLDER, attach_scores


ARTIFACT_FOLDERS = ("embeddings", "latents", "media")
"""The artifacts of a manifest item, each under the item field of its folder's name."""


def artifact_path(uri: str) -> str:
    """The store-relative path (`latents/sdxl/<key>.safetensors`) of an artifact URI in a manifest, whichever
    store, or wherever the store has moved since."""
    parts = uri.split("/")
    start = max(index for index, part in enumerate(parts) if part in (*ARTIFACT_FOLDERS, SCORES_FOLDER))
    return "/".join(parts[start:])


def item_paths(item: dict) -> set[str]:
    """The store-relative paths of every file a manifest item names: its artifacts and score files."""
    uris = [item[kind] for kind in ARTIFACT_FOLDERS if item.get(kind)]
    uris += (item.get(SCORE_FILES) or {}).values()
    return {artifact_path(uri) for uri in uris}


def default_run_name(model: str) -> str:
    """`<model name>-<date>-<time>-<random>`: unique, and sorted by time."""
    name = model.split("@", 1)[0].rstrip("/").rsplit("/", 1)[-1]  # `org/name@<commit>`: the name
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def manifest_of(plan: Plan) -> dict:
    """The manifest as a dict: model, family, the settings every item shares (and the swept ones with their
    values), and one entry per item with its own settings and artifact URIs."""
    store = plan.store
    per_point = {point: settings_of(point.settings) for point in plan.points}
    shared = {name: value for name, value in per_point[plan.points[0]].items()
              if all(settings[name] == value for settings in per_point.values())}
    swept = {name: list(dict.fromkeys(settings[name] for settings in per_point.values()))
             for name in per_point[plan.points[0]] if name not in shared}
    document = {
        "model": plan.request.model,
        "model_revision": plan.model.revision,
        "model_fingerprints": plan.model_fingerprints,
        "family": plan.family.name,
        "settings": shared,
    }
    if swept:
        document["grid"] = swept
    if plan.loras:
        scales = dict(plan.request.lora_scales)
        document["loras"] = [{"source": lora.source, "digest": lora.digest, "components": list(lora.components),
                              "scales": list(scales[lora.source])} for lora in plan.loras]
    document["items"] = [
        {
            "prompt": item.prompt,
            "negative_prompt": item.embedding.negative_prompt,
            "seed": item.seed,
            "settings": per_point[item.point],
            **({"loras": [{"source": source, "scale": scale} for source, scale in item.point.lora_scales]}
               if plan.loras else {}),
            "embeddings": store.uri_of(item.embedding.path),
            "latents": store.uri_of(item.latents_path),
            "media": store.uri_of(item.media_path),
        }
        for item in plan.items
    ]
    if plan.request.scores:
        attach_scores(plan, document)
    return document


def settings_of(settings: Settings) -> dict:
    """Resolved settings as the manifest records them."""
    recorded = {field.name: getattr(settings, field.name) for field in dataclasses.fields(settings)
                if field.name not in ("extras", "cache")}
    cache = {"cache": settings.cache.settings} if settings.cache is not None else {}
    return {**recorded, **settings.extras, **cache}


def write_manifest(plan: Plan, run_name: str, copy_to: str | None = None) -> str:
    """Write runs/<run_name>/manifest.json to the store, and a copy at `copy_to`; return the store URI."""
    check_run_name(run_name)
    if copy_to:
        check_location("--manifest", copy_to)
    document = manifest_of(plan)
    uri = plan.store.write_json(f"runs/{run_name}/manifest.json", document)
    if copy_to:
        path = Path(copy_to)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2))
    return uri


@dataclass(frozen=True)
class RunManifest:
    """A run's manifest and its title (the run name)."""

    title: str
    manifest: dict


def read_run_manifest(location: str, option: str = "MANIFEST") -> RunManifest:
    """A run's manifest (local or gs://), titled by its run name (the folder of a `manifest.json`); one-line
    errors for a missing file or one that is no run manifest."""
    from stagediff.gcs import read_location

    check_location(option, location)
    try:
        manifest = json.loads(read_location(location))
        manifest["items"]
    except FileNotFoundError:
        raise StagediffError(f"manifest {location}: no such file") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise StagediffError(f"manifest {location}: not a run manifest ({one_line(error)})") from None
    parts = location.rstrip("/").split("/")
    return RunManifest(parts[-2] if len(parts) > 1 and parts[-1] == "manifest.json" else parts[-1], manifest)
