"""What a generate run shows in the Prefect UI: a progress artifact, the manifest as a table, and a
markdown gallery of the finished items."""

from __future__ import annotations

import base64
import io

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from stagediff.manifest import manifest_of
from stagediff.plan import Plan

PREVIEW_ITEMS = 16
PREVIEW_PIXELS = 256


class RunProgress:
    """Items done / total for the whole run: those the store already held, then each chunk's as it
    finishes, and every item once the run completes."""

    def __init__(self, total: int, done: int):
        self.total, self.done = total, done
        self.artifact_id = create_progress_artifact(self._percent(), description=self._description())

    def advance(self, items: int) -> None:
        self.done = min(self.total, self.done + items)
        update_progress_artifact(self.artifact_id, self._percent(), description=self._description())

    def finish(self) -> None:
        self.advance(self.total - self.done)

    def _percent(self) -> float:
        return 100.0 * self.done / self.total

    def _description(self) -> str:
        return f"{self.done}/{self.total} items"


def artifact_key(run_name: str, kind: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    cleaned = "".join(c if c.isalnum() else "-" for c in run_name.lower())
    return f"{kind}-{cleaned}".strip("-")[:120]


def publish_results(plan: Plan, run_name: str) -> None:
    """Create the manifest table and the image gallery artifacts of a finished run."""
    manifest = manifest_of(plan)
    rows = [{"prompt": i["prompt"], "seed": i["seed"], "media": i["media"], "latents": i["latents"]} for i in manifest["items"]]
    create_table_artifact(rows, key=artifact_key(run_name, "manifest"), description=f"{plan.family.name}: {plan.request.model}")
    create_markdown_artifact(gallery_markdown(plan, manifest), key=artifact_key(run_name, "gallery"))


def gallery_markdown(plan: Plan, manifest: dict) -> str:
    """Thumbnails (inline, for the first items of image runs) with links to every media file."""
    lines = [f"# {plan.family.name} · {plan.request.model}", ""]
    for index, item in enumerate(manifest["items"]):
        caption = f"**{item['prompt']}** · seed {item['seed']}"
        media_path = plan.items[index].media_path
        if index < PREVIEW_ITEMS and media_path.endswith(".png"):
            lines.append(f"![{item['prompt']} seed {item['seed']}]({_thumbnail(plan, media_path)})")
        lines.append(f"{caption} · [{item['media']}]({_link(item['media'])})")
        lines.append("")
    return "\n".join(lines)


def _thumbnail(plan: Plan, media_path: str) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(plan.store.read_bytes(media_path))) as image:
        image.thumbnail((PREVIEW_PIXELS, PREVIEW_PIXELS))
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _link(uri: str) -> str:
    if uri.startswith("gs://"):
        return "https://storage.cloud.google.com/" + uri[len("gs://") :]
    return uri if "://" in uri else f"file://{uri}"
