"""A scored sweep, as Prefect runs it: each run scores its items, publishes its score summary as a table
artifact, and charts the mean score of every run of the sweep so far (read from their manifests)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from stagediff.tiny.clip import build as build_clip


@pytest.fixture(scope="module")
def prefect_api():
    """One ephemeral Prefect server for this module (no workers needed: stages run in-process)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):  # a busy 2-core machine starts it slowly
        yield


def test_a_scored_sweep_publishes_its_summary_and_a_trend_with_one_point_per_run(prefect_api, tiny_sdxl, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.sweep import sweep
    from stagediff.trends import sweep_trend
    from stagediff.store import Store

    clip = build_clip(tmp_path / "clip")
    store = tmp_path / "store"
    parameters = dict(model=str(tiny_sdxl), prompts=["a red cat", "a blue dog"], seed_start=0, steps=1, height=32,
                      width=32, guidance=[3.0, 5.0], store=str(store), dispatch="in-process", scores=[f"clip:{clip}"])
    sweep(**parameters, seed_count=1)
    sweep(**parameters, seed_count=2)

    runs = sorted(path.parent.name for path in store.glob("runs/*/manifest.json"))
    assert len(runs) == 2 and all(name.startswith("sweep-local-") for name in runs)
    latest = json.loads((store / "runs" / runs[-1] / "manifest.json").read_text())
    assert len(latest["items"]) == 8 and all(item["scores"] for item in latest["items"])
    assert len(list((store / "scores/clip").glob("*.json"))) == 8  # the second run scored only its new items

    points = sweep_trend(Store(str(store)), "sweep-local")
    assert [point.run_name for point in points] == runs
    trend = (store / "runs" / runs[-1] / "score-trend.png").read_bytes()
    with Image.open(io.BytesIO(trend)) as image:
        image.verify()
    assert np.asarray(Image.open(io.BytesIO(trend))).shape[:2] == (420, 720)

    with get_client(sync_client=True) as client:
        def artifact(key):
            found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
            assert found, f"no artifact {key}"
            return found[-1]

        summary = artifact(f"scores-{runs[-1]}")
        rows = json.loads(summary.data) if isinstance(summary.data, str) else summary.data
        assert [row["point"] for row in rows] == ["guidance 3", "guidance 5"]
        assert all(row["count"] == 4 for row in rows)
        assert "score trend" in artifact("score-trend-sweep-local").data
