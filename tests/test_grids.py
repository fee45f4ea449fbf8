"""Grids and contact sheets: one run renders prompts × seeds × the swept values (steps, guidance, flow shift,
LoRA scales), each item with its own settings and the keys a single-valued run would give it; every run
writes a labelled contact sheet, and `stagediff contact-sheet` puts runs side by side."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from helpers import run_all_stages, snapshot, stored_item
from reference import relative_error
from stagediff.cli import build_parser, main
from stagediff.contact_sheet import render_contact_sheet, sheet_layout
from stagediff.manifest import RunManifest
from stagediff.media import mp4_bytes, read_png_metadata
from stagediff.options import request_from_options
from stagediff.plan import make_plan
from stagediff.request import Request

PROMPTS = ("a red cat", "a blue dog")
SIZE = ("--height", "32", "--width", "48")


def generate(model, store, run_name, *extra):
    args = ["generate", "--model", str(model), *(a for p in PROMPTS for a in ("--prompt", p)), "--seed", "0",
            "--seed", "1", "--steps", "1", *SIZE, "--store", str(store), "--run-name", run_name, *extra]
    assert main(args) == 0


def scales(lora, *values):
    return [a for value in values for a in ("--lora", f"{lora}:{value}")]


def image_of(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_a_grid_of_prompts_seeds_and_scales_renders_every_item_and_a_labelled_contact_sheet(tiny_models, tiny_loras, tmp_path):
    model, lora, store = tiny_models("flux1"), tiny_loras("flux1"), tmp_path / "store"
    generate(model, store, "three-scales", *scales(lora, 0, 0.5, 1))

    manifest = json.loads((store / "runs/three-scales/manifest.json").read_text())
    items = manifest["items"]
    assert len(items) == 12
    assert {(i["prompt"], i["seed"], i["loras"][0]["scale"]) for i in items} == {
        (p, s, x) for p in PROMPTS for s in (0, 1) for x in (0.0, 0.5, 1.0)}
    assert manifest["loras"][0]["scales"] == [0.0, 0.5, 1.0]
    media = read_png_metadata(Path(items[1]["media"]).read_bytes())
    assert (media["seed"], media.get("loras")) == (1, None)  # scale 0: the base model, no LoRA applied
    assert read_png_metadata(Path(items[2]["media"]).read_bytes())["loras"][0]["scale"] == 0.5

    sheet = store / "runs/three-scales/contact-sheet.png"
    layout = sheet_layout([RunManifest("three-scales", manifest)], (48, 32))
    assert (len(layout.rows), len(layout.columns)) == (2, 6)
    assert [column.label for column in layout.columns[:3]] == [("seed 0", "lora 0"), ("seed 1", "lora 0"),
                                                             ("seed 0", "lora 0.5")]
    pixels = image_of(sheet)
    assert pixels.shape[1::-1] == layout.size
    for (row, column), uri in layout.cells.items():
        left, top, right, bottom = layout.cell_box(row, column)
        assert np.array_equal(pixels[top:bottom, left:right], image_of(uri))

    # A fourth scale: only its items are computed; the embeddings serve every scale (a denoiser-only LoRA).
    before = snapshot(store)
    generate(model, store, "four-scales", *scales(lora, 0, 0.5, 1, 2))
    after = snapshot(store)
    new = sorted(path.split("/")[0] for path in after if path not in before and not path.startswith("runs/"))
    assert new == ["latents"] * 4 + ["media"] * 4
    assert all(after[path] == mtime for path, mtime in before.items())
    assert len(json.loads((store / "runs/four-scales/manifest.json").read_text())["items"]) == 16


def test_grid_items_have_the_keys_of_single_valued_runs(tiny_models, tiny_loras, tmp_path):
    model, lora = str(tiny_models("sdxl")), str(tiny_loras("sdxl"))
    options = dict(model=model, prompts=list(PROMPTS), seeds=[0, 1], store=str(tmp_path))
    grid = make_plan(Request(**options, steps=[1, 2], guidance=[3.0, 6.0], loras=[f"{lora}:0", f"{lora}:0.5"]))
    assert len(grid.items) == 2 * 2 * 2 * 2 * 2
    for item in grid.items:
        (scale,) = [s for _, s in item.point.lora_scales]
        single = make_plan(Request(**{**options, "prompts": [item.prompt], "seeds": [item.seed]},
                                   steps=item.settings.steps, guidance=item.settings.guidance,
                                   loras=[f"{lora}:{scale}"] if scale else []))
        (expected,) = single.items
        assert (item.embedding.key, item.latents_key, item.media_key) == (
            expected.embedding.key, expected.latents_key, expected.media_key)


def test_a_denoise_batch_holds_items_of_one_grid_point(tiny_models, tmp_path):
    options = dict(model=str(tiny_models("flux1")), prompts=[PROMPTS[0]], seeds=[0, 1], height=32, width=48)
    grid = Request(**options, steps=[1, 2], batch_size=4, store=str(tmp_path / "grid"))
    single = Request(**options, steps=2, store=str(tmp_path / "single"))
    run_all_stages(grid)
    run_all_stages(single)
    for seed in (0, 1):
        plan = make_plan(grid)
        (item,) = [i for i in plan.items if i.seed == seed and i.settings.steps == 2]
        latents = plan.store.read_tensors(item.latents_path, item.latents_key)["latents"]
        assert relative_error(latents, stored_item(single, PROMPTS[0], seed)[0]) < 1e-4


def test_grid_flags_repeat_and_flow_parameters_take_lists(tiny_models):
    import inspect

    from flows.generate import generate as generate_flow

    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", "--seed", "0", "--guidance", "3",
                                      "--guidance", "5", "--steps", "4", "--flow-shift", "3", "--flow-shift", "5"])
    request = request_from_options(vars(args))
    assert (request.guidance, request.steps, request.extras["flow_shift"]) == ((3.0, 5.0), 4, (3.0, 5.0))
    parameters = inspect.signature(generate_flow.fn).parameters
    assert parameters["guidance"].annotation == float | list[float] | None
    assert request_from_options({"model": "m", "prompts": ["p"], "seeds": [0], "guidance": [3, 5]}).guidance == (3, 5)


def test_flow_shift_sweeps_wan(tiny_models, tmp_path):
    plan = make_plan(Request(model=str(tiny_models("wan")), prompts=[PROMPTS[0]], seeds=[0], store=str(tmp_path),
                             extras={"flow_shift": [3.0, 5.0]}))
    assert [item.settings.extras["flow_shift"] for item in plan.items] == [3.0, 5.0]
    assert plan.items[0].embedding is plan.items[1].embedding
    assert plan.items[0].latents_key != plan.items[1].latents_key


def test_contact_sheet_puts_runs_side_by_side(tiny_models, tiny_loras, tmp_path):
    model, lora, store = tiny_models("flux1"), tiny_loras("flux1"), tmp_path / "store"
    generate(model, store, "base")
    generate(model, store, "lora", *scales(lora, 0.8))
    output = tmp_path / "side-by-side.png"
    assert main(["contact-sheet", str(store / "runs/base/manifest.json"), str(store / "runs/lora/manifest.json"),
                 "--output", str(output)]) == 0
    runs = [RunManifest(name, json.loads((store / f"runs/{name}/manifest.json").read_text())) for name in ("base", "lora")]
    layout = sheet_layout(runs, (48, 32))
    assert (len(layout.rows), [column.run for column in layout.columns]) == (2, [0, 0, 1, 1])
    pixels = image_of(output)
    assert pixels.shape[1::-1] == layout.size
    for (row, column), uri in layout.cells.items():
        left, top, right, bottom = layout.cell_box(row, column)
        assert np.array_equal(pixels[top:bottom, left:right], image_of(uri))


def test_a_video_shows_its_middle_frame(tmp_path):
    colours = [np.full((1, 32, 48, 3), 40 * index, np.uint8) for index in range(5)]
    media = {"clip.mp4": mp4_bytes(colours, 16, {"frames": 5})}
    manifest = {"model": "m", "items": [{"prompt": "a cat walks", "seed": 0, "media": "clip.mp4"}]}
    sheet = np.asarray(render_contact_sheet([RunManifest("video", manifest)], media.__getitem__))
    left, top, right, bottom = sheet_layout([RunManifest("video", manifest)], (48, 32)).cell_box(0, 0)
    assert np.abs(sheet[top:bottom, left:right].astype(int) - 80).max() <= 3


def test_contact_sheet_of_a_missing_manifest_fails_with_one_line(tmp_path, capsys):
    assert main(["contact-sheet", str(tmp_path / "none.json"), "--output", str(tmp_path / "sheet.png")]) == 2
    error = capsys.readouterr().err
    assert error == f"stagediff: error: manifest {tmp_path / 'none.json'}: no such file\n"
    assert not (tmp_path / "sheet.png").exists()


def test_a_missing_media_file_leaves_its_cell_blank(tiny_models, tmp_path):
    store = tmp_path / "store"
    generate(tiny_models("flux1"), store, "run")
    manifest = json.loads((store / "runs/run/manifest.json").read_text())
    Path(manifest["items"][0]["media"]).unlink()
    sheet = np.asarray(render_contact_sheet([RunManifest("run", manifest)], lambda uri: Path(uri).read_bytes()))
    layout = sheet_layout([RunManifest("run", manifest)], (48, 32))
    for column, blank in ((0, True), (1, False)):
        left, top, right, bottom = layout.cell_box(0, column)
        cell = sheet[top:bottom, left:right]
        assert (cell == cell[0, 0]).all() == blank
