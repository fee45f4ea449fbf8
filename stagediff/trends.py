"""Trends across scheduled runs: the summary score of each earlier run of a sweep (read from the runs'
manifests in the store), in the order they were written, as a chart (light core: listings, manifests
and Pillow)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from stagediff.charts import line_chart_png
from stagediff.scoring import run_score, summarize
from stagediff.store import Store

MAX_RUNS = 60
"""Runs a trend shows at most (the latest)."""


@dataclass(frozen=True)
class TrendPoint:
    run_name: str
    written: float
    """When its manifest was written (seconds since the epoch)."""
    scores: dict[str, float]
    """Scorer → the run's mean score."""


def sweep_trend(store: Store, run_prefix: str) -> list[TrendPoint]:
    """The scored runs whose names start with `run_prefix`, oldest first (by when their manifests were
    written), each with its mean score per scorer; unreadable manifests are left out."""
    manifests = [(path, listed) for path, listed in store.walk("runs").items()
                 if path.endswith("/manifest.json") and path.split("/")[1].startswith(run_prefix)]
    manifests.sort(key=lambda entry: (entry[1].modified or 0.0, entry[0]))
    points = []
    for path, listed in manifests[-MAX_RUNS:]:
        try:
            manifest = json.loads(store.read_bytes(path))
            scores = {name: run_score(manifest, name) for name in manifest.get("score_summary") or summarize(manifest)}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # not a manifest this version reads
        scores = {name: value for name, value in scores.items() if value is not None}
        if scores:
            points.append(TrendPoint(path.split("/")[1], listed.modified or 0.0, scores))
    return points


def trend_chart_png(points: list[TrendPoint], title: str) -> bytes:
    """Each scorer's run score against the run (in time order, labelled by date), one line per scorer."""
    names = list(dict.fromkeys(name for point in points for name in point.scores))
    series = {name: [(float(number), point.scores[name]) for number, point in enumerate(points) if name in point.scores]
              for name in names}
    every = max(1, len(points) // 8)  # at most about 8 labels fit under the axis
    ticks = {float(number): time.strftime("%m-%d %H:%M", time.gmtime(point.written))
             for number, point in enumerate(points) if number % every == 0}
    return line_chart_png(series, title=title, x_label="run (UTC)", y_label="mean score", x_ticks=ticks)
