"""The run manifest: which artifacts belong to which (prompt, seed)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from stagediff.confinement import check_location, check_run_name
from stagediff.plan import Plan


ARTIFACT_FOLDERS = ("embeddings", "latents", "media")


def artifact_path(uri: str) -> str:
    """The store-relative path (`latents/sdxl/<key>.safetensors`) of an artifact URI in a manifest, whichever
    store, or wherever the store has moved since."""
    parts = uri.split("/")
    start = max(index for index, part in enumerate(parts) if part in ARTIFACT_FOLDERS)
    return "/".join(parts[start:])


def default_run_name(model: str) -> str:
    """`<model name>-<date>-<time>-<random>`: unique, and sorted by time."""
    return f"{model.rstrip('/').rsplit('/', 1)[-1]}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def manifest_of(plan: Plan) -> dict:
    """The manifest as a dict: model, family and one entry per (prompt, seed) with artifact URIs."""
    store = plan.store
    return {
        "model": plan.request.model,
        "model_revision": plan.model.revision,
        "model_fingerprints": plan.model_fingerprints,
        "family": plan.family.name,
        "settings": {
            "steps": plan.settings.steps,
            "guidance": plan.settings.guidance,
            "height": plan.settings.height,
            "width": plan.settings.width,
            "frames": plan.settings.frames,
            "fps": plan.settings.fps,
            "dtype": plan.settings.dtype,
            **plan.settings.extras,
            **({"cache": plan.settings.cache.settings} if plan.settings.cache is not None else {}),
        },
        "items": [
            {
                "prompt": item.prompt,
                "negative_prompt": item.embedding.negative_prompt,
                "seed": item.seed,
                "embeddings": store.uri_of(item.embedding.path),
                "latents": store.uri_of(item.latents_path),
                "media": store.uri_of(item.media_path),
            }
            for item in plan.items
        ],
    }


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
