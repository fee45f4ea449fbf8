"""Small helpers shared by the tests."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stagediff import stages
from stagediff.plan import make_plan
from stagediff.request import Request


def run_all_stages(request: Request) -> dict[str, stages.StageResult]:
    """encode → denoise → decode for a request, as the generate flow does without Prefect."""
    plan = make_plan(request)
    return {
        "encode": stages.encode(plan),
        "denoise": stages.denoise(plan),
        "decode": stages.decode(plan),
    }


def stored_item(request: Request, prompt: str, seed: int):
    """(latents tensor, uint8 pixels) that the store holds for one (prompt, seed)."""
    plan = make_plan(request)
    item = next(i for i in plan.items if i.prompt == prompt and i.seed == seed)
    latents = plan.store.read_tensors(item.latents_path, item.latents_key)["latents"]
    pixels = None
    if item.media_path.endswith(".png"):
        pixels = np.asarray(Image.open(io.BytesIO(plan.store.read_bytes(item.media_path))).convert("RGB"))
    return latents, pixels


def snapshot(folder: Path) -> dict[str, float]:
    """Relative path -> modification time of every file under a store folder."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def one_line_error(args: list[str], capsys) -> str:
    """Run the `stagediff` command in-process with `args`; check that it fails with exit code 2 and one
    error line, and return that line."""
    from stagediff.cli import main

    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main(args))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("stagediff: error: ") and error.count("\n") == 1, error
    return error
