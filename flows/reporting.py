"""What a generate run shows in the Prefect UI: a progress artifact, the manifest as a table, a markdown
gallery of the finished items, the run's contact sheet, and for a scored run its score summary as a table
(a sweep adds the trend of its runs' scores)."""

from __future__ import annotations

import base64
import io

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from stagediff.contact_sheet import SHEET_NAME, write_contact_sheet
from stagediff.manifest import manifest_of
from stagediff.plan import Plan
from stagediff.scoring import summary_rows
from stagediff.store import Store
from stagediff.trends import sweep_trend, trend_chart_png

PREVIEW_ITEMS = 16
PREVIEW_PIXELS = 256
SHEET_PREVIEW_PIXELS = 1600


class RunProgress:
    """Items done / total for the whole run, as a progress artifact: those the store already held, then
    each decode run's items as it finishes."""

    def __init__(self):
        self.artifact_id = None

    def update(self, done: int, total: int) -> None:
        percent, description = 100.0 * done / total, f"{done}/{total} items"
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(percent, description=description)
        else:
            update_progress_artifact(self.artifact_id, percent, description=description)


def artifact_key(run_name: str, kind: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    cleaned = "".join(c if c.isalnum() else "-" for c in run_name.lower())
    return f"{kind}-{cleaned}".strip("-")[:120]


def publish_results(plan: Plan, run_name: str) -> None:
    """Write the run's contact sheet; create the manifest table, image gallery and contact sheet artifacts."""
    manifest = manifest_of(plan)
    sheet_uri = write_contact_sheet(plan.store, run_name, manifest)
    rows = [{"prompt": i["prompt"], "seed": i["seed"], "media": i["media"], "latents": i["latents"],
             **{f"score {name}": value for name, value in (i.get("scores") or {}).items()}} for i in manifest["items"]]
    create_table_artifact(rows, key=artifact_key(run_name, "manifest"), description=f"{plan.family.name}: {plan.request.model}")
    if manifest.get("score_summary"):
        create_table_artifact(summary_rows(manifest), key=artifact_key(run_name, "scores"),
                              description="scores per grid point: mean, standard deviation, worst prompts")
    create_markdown_artifact(gallery_markdown(plan, manifest), key=artifact_key(run_name, "gallery"))
    sheet = _preview(plan.store.read_bytes(f"runs/{run_name}/{SHEET_NAME}"), SHEET_PREVIEW_PIXELS)
    create_markdown_artifact(f"# {run_name}\n\n![contact sheet]({sheet})\n\n[{sheet_uri}]({_link(sheet_uri)})",
                             key=artifact_key(run_name, "contact-sheet"), description="rows: prompts; columns: seeds "
                             "and swept values")


TREND_NAME = "score-trend.png"


def publish_trend(store: Store, run_prefix: str, run_name: str) -> str | None:
    """Chart the mean score of each run named `run_prefix...` over time (from their manifests), write it
    next to this run's manifest and publish it as a markdown artifact; return its URI (None: no scored run)."""
    points = sweep_trend(store, run_prefix)
    if not points:
        return None
    png = trend_chart_png(points, f"{run_prefix}: mean score per run")
    uri = store.write_bytes(f"runs/{run_name}/{TREND_NAME}", png)
    lines = [f"# Scores of {run_prefix} runs", "", f"![score trend]({_preview(png, SHEET_PREVIEW_PIXELS)})", "",
             "| run | " + " | ".join(points[-1].scores) + " |", "|---|" + "---|" * len(points[-1].scores)]
    lines += [f"| {point.run_name} | " + " | ".join(f"{point.scores.get(name, float('nan')):.3f}"
                                                   for name in points[-1].scores) + " |" for point in points]
    create_markdown_artifact("\n".join(lines), key=artifact_key(run_prefix, "score-trend"),
                             description="mean score of each scheduled run, oldest first")
    return uri


def gallery_markdown(plan: Plan, manifest: dict) -> str:
    """Thumbnails (inline, for the first items of image runs) with links to every media file."""
    lines = [f"# {plan.family.name} · {plan.request.model}", ""]
    for index, item in enumerate(manifest["items"]):
        swept = [f"{name} {item['settings'][name]}" for name in manifest.get("grid", {})]
        swept += [f"{lora['source']} × {lora['scale']}" for lora in item.get("loras", ())]
        caption = " · ".join([f"**{item['prompt']}**", f"seed {item['seed']}", *swept])
        media_path = plan.items[index].media_path
        if index < PREVIEW_ITEMS and media_path.endswith(".png"):
            lines.append(f"![{item['prompt']} seed {item['seed']}]({_preview(plan.store.read_bytes(media_path), PREVIEW_PIXELS)})")
        lines.append(f"{caption} · [{item['media']}]({_link(item['media'])})")
        lines.append("")
    return "\n".join(lines)


def _preview(png: bytes, pixels: int) -> str:
    """An image scaled down to fit `pixels`, as an inline JPEG."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        image.thumbnail((pixels, pixels))
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _link(uri: str) -> str:
    if uri.startswith("gs://"):
        return "https://storage.cloud.google.com/" + uri[len("gs://") :]
    return uri if "://" in uri else f"file://{uri}"
