"""A run's contact sheet is copied from an earlier run's only when it shows the same media files, not
merely the same paths."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from stagediff.cli import main
from stagediff.contact_sheet import write_contact_sheet
from stagediff.manifest import artifact_path
from stagediff.store import Store


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_a_sheet_is_drawn_again_when_its_media_were_written_again(tiny_sdxl, tmp_path):
    store_folder = tmp_path / "store"
    assert main(["generate", "--model", str(tiny_sdxl), "--prompt", "a red cat", "--seeds", "0-1", "--steps", "2",
                 "--store", str(store_folder), "--run-name", "a"]) == 0
    store = Store(str(store_folder))
    manifest = json.loads((store_folder / "runs/a/manifest.json").read_text())
    sheet_a = (store_folder / "runs/a/contact-sheet.png").read_bytes()

    write_contact_sheet(store, "same", manifest)  # nothing changed: copied, not drawn
    assert (store_folder / "runs/same/contact-sheet.png").read_bytes() == sheet_a

    media = store_folder / artifact_path(manifest["items"][0]["media"])
    size = Image.open(media).size
    buffer = io.BytesIO()
    Image.new("RGB", size, (255, 0, 0)).save(buffer, format="PNG")
    media.write_bytes(buffer.getvalue())  # the same path, other pixels
    write_contact_sheet(store, "b", manifest)
    sheet_b = (store_folder / "runs/b/contact-sheet.png").read_bytes()
    assert not np.array_equal(_pixels(sheet_a), _pixels(sheet_b))
    red = np.all(_pixels(sheet_b) == (255, 0, 0), axis=-1)
    assert red.sum() > 100  # the new image is on the sheet
