"""The score stage: `--score clip[:MODEL]` scores every finished item once per scorer identity (CLIP score
as torchmetrics defines it, equal to transformers' CLIP model computing it directly), the manifest carries
the scores and a summary per grid point, and `stagediff compare` reports two runs' differences."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import one_line_error, snapshot
from stagediff import stages
from stagediff.cli import main
from stagediff.compare import compare_runs
from stagediff.manifest import RunManifest, artifact_path
from stagediff.inventory import plan_state
from stagediff.media import mp4_bytes
from stagediff.plan import SCORE, make_plan
from stagediff.request import Request
from stagediff.run_records import plan_paths
from stagediff.scheduler import schedule
from stagediff.scoring import parse_score, score_tasks, summarize

PROMPTS = ("a red cat", "a blue dog")
ROOT = Path(__file__).resolve().parents[1]


def reference_clip_scores(folder: Path, images: list[np.ndarray], prompts: list[str]) -> list[float]:
    """CLIP score the way torchmetrics computes it (`clip_score`: processor over texts and images, the
    model's embeddings, 100 × cosine, clipped at 0), one (image, prompt) pair at a time with transformers'
    CLIPProcessor and the full CLIPModel forward. A prompt longer than the model reads is truncated by the
    tokenizer (keeping its end token, as diffusers' pipelines do; torchmetrics slices the ids instead)."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    scores = []
    for image, prompt in zip(images, prompts):
        inputs = processor(text=[prompt], images=[Image.fromarray(image)], return_tensors="pt", padding=True,
                           truncation=True, max_length=77)
        with torch.no_grad():
            output = model(**inputs)
        image_embeds = output.image_embeds / output.image_embeds.norm(dim=-1, keepdim=True)
        text_embeds = output.text_embeds / output.text_embeds.norm(dim=-1, keepdim=True)
        scores.append(max(0.0, float(100 * (image_embeds * text_embeds).sum())))
    return scores


def random_images(count: int, seed: int = 0) -> list[np.ndarray]:
    generator = np.random.default_rng(seed)
    shapes = [(32, 48), (64, 64), (40, 24)]
    return [generator.integers(0, 256, (*shapes[i % 3], 3), dtype=np.uint8) for i in range(count)]


def test_clip_scores_equal_transformers_clip_model_computing_them_directly(tiny_clip):
    from stagediff.scorers import ClipScorer
    from stagediff.scoring import open_scorer

    images = random_images(6)
    # Prompts of both signs of cosine with the tiny random model: clipping at 0 is exercised.
    prompts = ["x", "a red cat", "x", "zz", "a blue dog on a long road " * 10, "x"]
    scorer = ClipScorer(open_scorer(parse_score(f"clip:{tiny_clip}")))
    ours = scorer.scores([[image] for image in images], prompts)
    reference = reference_clip_scores(tiny_clip, images, prompts)
    np.testing.assert_allclose(ours, reference, atol=1e-4)
    assert any(value == 0 for value in reference) and any(value > 0 for value in reference)


def test_a_video_scores_the_mean_over_frames_sampled_evenly(tiny_clip):
    from stagediff.scorers import ClipScorer, media_frames
    from stagediff.scoring import open_scorer

    frames = np.stack(random_images(17, seed=1)[1::3][:1] * 17)  # one size for a video
    frames = np.stack([np.roll(frames[0], 3 * index, axis=1) for index in range(17)])
    data = mp4_bytes([frames], 8, {"prompt": "x"})
    sampled = media_frames(data, "mp4")
    assert len(sampled) == 8
    import imageio.v3 as iio

    decoded = iio.imread(io.BytesIO(data), extension=".mp4")  # every frame, decoded independently
    expected_indices = [0, 2, 5, 7, 9, 11, 14, 16]
    for frame, index in zip(sampled, expected_indices):
        np.testing.assert_array_equal(frame, decoded[index])
    scorer = ClipScorer(open_scorer(parse_score(f"clip:{tiny_clip}")))
    (score,) = scorer.scores([sampled], ["x"])
    reference = reference_clip_scores(tiny_clip, [decoded[i] for i in expected_indices], ["x"] * 8)
    assert score == pytest.approx(float(np.mean(reference)), abs=1e-4)


def generate(model, store, run_name, *extra):
    args = ["generate", "--model", str(model), *(a for p in PROMPTS for a in ("--prompt", p)), "--seeds", "0-1",
            "--steps", "1", "--height", "32", "--width", "32", "--store", str(store), "--run-name", run_name, *extra]
    assert main(args) == 0
    return json.loads((Path(store) / f"runs/{run_name}/manifest.json").read_text())


def request_of(model, store, clip, **changes) -> Request:
    values = dict(model=str(model), prompts=PROMPTS, seeds=(0, 1), steps=1, height=32, width=32, store=str(store),
                  guidance=(3.0, 5.0), scores=(f"clip:{clip}",))
    return Request(**{**values, **changes})


@pytest.fixture(scope="module")
def scored_run(tiny_sdxl, tiny_clip, tmp_path_factory) -> tuple[Path, dict]:
    """A generated run of 2 prompts × 2 seeds × guidance 3 and 5, scored with the tiny CLIP: (store, manifest)."""
    store = tmp_path_factory.mktemp("scored") / "store"
    return store, generate(tiny_sdxl, store, "scored", "--guidance", "3", "--guidance", "5", "--score", f"clip:{tiny_clip}")


def test_generate_scores_every_item_and_summarizes_each_grid_point(scored_run, tiny_clip):
    store, manifest = scored_run
    name = f"clip:{tiny_clip}"
    items = manifest["items"]
    assert len(items) == 8 and all(set(item["scores"]) == {name} for item in items)
    images = [np.asarray(Image.open(item["media"]).convert("RGB")) for item in items]
    reference = reference_clip_scores(tiny_clip, images, [item["prompt"] for item in items])
    np.testing.assert_allclose([item["scores"][name] for item in items], reference, atol=1e-4)

    assert len(list((store / "scores/clip").glob("*.json"))) == 8
    summary = manifest["score_summary"][name]
    assert [point["values"] for point in summary] == [{"guidance": 3.0}, {"guidance": 5.0}]
    for point in summary:
        values = [v for item, v in zip(items, reference) if item["settings"]["guidance"] == point["values"]["guidance"]]
        assert point["count"] == 4
        assert point["mean"] == pytest.approx(np.mean(values), abs=1e-4)
        assert point["std"] == pytest.approx(np.std(values), abs=1e-4)
        assert len(point["worst"]) == 2 and point["worst"][0]["score"] <= point["worst"][1]["score"]
    assert manifest["scorers"][name]["identity"]


def test_the_contact_sheet_shows_each_items_scores_under_its_tile(scored_run):
    from stagediff.contact_sheet import BACKGROUND, sheet_layout
    from stagediff.manifest import RunManifest

    store, manifest = scored_run
    layout = sheet_layout([RunManifest("scored", manifest)], (32, 32))
    assert len(layout.cell_scores) == 8
    item = manifest["items"][0]
    assert layout.cell_scores[(0, 0)] == f"clip {next(iter(item['scores'].values())):.2f}"
    sheet = np.asarray(Image.open(store / "runs/scored/contact-sheet.png").convert("RGB"))
    assert sheet.shape[1::-1] == layout.size
    for (row, column) in layout.cell_scores:
        left, _, right, bottom = layout.cell_box(row, column)
        under = sheet[bottom + 1: bottom + 1 + 15, left:right]
        assert (under != BACKGROUND).any(axis=-1).sum() > 20  # the score's text


def test_a_rerun_computes_no_score(tiny_sdxl, tiny_clip, tmp_path):
    store = tmp_path / "store"
    request = request_of(tiny_sdxl, store, tiny_clip)
    plan = make_plan(request)
    for stage in ("encode", "denoise", "decode", "score"):
        stages.run_stage(stage, plan)
    before = snapshot(store)

    stages.release()
    again = make_plan(request)
    assert stages.run_stage(SCORE, again).computed == 0
    assert stages.loaded_components(SCORE) == ()  # nothing to score: nothing loaded
    assert schedule(again, plan_state(again), accelerators=1) == []
    assert generate(tiny_sdxl, store, "again", "--guidance", "3", "--guidance", "5", "--score", f"clip:{tiny_clip}")
    after = snapshot(store)
    assert {path: after[path] for path in before} == before  # nothing rewritten
    assert not [path for path in after if path not in before and not path.startswith("runs/")]


def test_the_score_stage_loads_only_the_scorer(tiny_sdxl, tiny_clip, tmp_path):
    plan = make_plan(request_of(tiny_sdxl, tmp_path / "store", tiny_clip, guidance=None))
    for stage in ("encode", "denoise", "decode"):
        stages.run_stage(stage, plan)
    stages.release()
    assert stages.run_stage(SCORE, plan).computed == 4
    assert set(stages._loaded) == {SCORE}
    assert stages.loaded_components(SCORE) == ("image_processor", "model", "tokenizer")


def test_a_changed_scorer_file_gives_new_score_keys_and_scores_everything_once(tiny_sdxl, tiny_clip, tmp_path):
    store, changed = tmp_path / "store", tmp_path / "clip-changed"
    shutil.copytree(tiny_clip, changed)
    config = json.loads((changed / "preprocessor_config.json").read_text())
    (changed / "preprocessor_config.json").write_text(json.dumps(config, indent=4))  # same settings, new bytes
    first = make_plan(request_of(tiny_sdxl, store, tiny_clip))
    for stage in ("encode", "denoise", "decode", "score"):
        stages.run_stage(stage, first)

    second = make_plan(request_of(tiny_sdxl, store, changed))
    old_keys = {task.key for task in score_tasks(first)}
    new_keys = {task.key for task in score_tasks(second)}
    assert len(new_keys) == 8 and not old_keys & new_keys
    units = schedule(second, plan_state(second), accelerators=1)
    assert {unit.stage for unit in units} == {SCORE}  # media exist: only scoring is left
    assert stages.run_stage(SCORE, second).computed == 8
    assert stages.run_stage(SCORE, second).computed == 0
    assert len(list((store / "scores/clip").glob("*.json"))) == 16


def test_scoring_a_finished_run_schedules_only_score_units_on_the_cpu_lane(tiny_sdxl, tiny_clip, tmp_path):
    from stagediff.scheduler import LocalExecutor

    store = tmp_path / "store"
    generate(tiny_sdxl, store, "plain")
    plan = make_plan(request_of(tiny_sdxl, store, tiny_clip, guidance=None))
    units = schedule(plan, plan_state(plan), accelerators=1)
    assert [unit.stage for unit in units] == ["score", "score"]
    assert sorted(key for unit in units for key in unit.keys) == sorted(item.latents_key for item in plan.items)
    assert LocalExecutor(lambda unit: None, overlap=True).lane(SCORE) == "cpu"

    fresh = make_plan(request_of(tiny_sdxl, tmp_path / "empty", tiny_clip, guidance=None))
    units = schedule(fresh, plan_state(fresh), accelerators=1)
    decodes = [unit for unit in units if unit.stage == "decode"]
    scores = [unit for unit in units if unit.stage == SCORE]
    assert len(decodes) == len(scores) == 2
    for decode, score in zip(decodes, scores):  # each chunk's score unit waits for its decode unit
        assert (score.after, score.keys) == ((decode.index,), decode.keys)


def test_score_is_an_option_a_request_field_and_a_flow_parameter():
    from flows.generate import GENERATE_OPTIONS
    from stagediff.cli import build_parser
    from stagediff.options import request_from_options

    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", "--seed", "0", "--score", "clip",
                                      "--score", "clip:org/other"])
    request = request_from_options(vars(args))
    assert request.scores == ("clip", "clip:org/other")
    assert request.to_dict()["scores"] == ["clip", "clip:org/other"]
    assert "scores" in {option.name for option in GENERATE_OPTIONS}
    assert parse_score("clip").model == "openai/clip-vit-large-patch14"


def test_bad_scorers_are_one_line_errors(tiny_sdxl, tmp_path, capsys):
    base = ["generate", "--model", str(tiny_sdxl), "--prompt", "p", "--seed", "0", "--store", str(tmp_path / "s")]
    assert "'sharpness'" in one_line_error([*base, "--score", "sharpness"], capsys)
    assert str(tmp_path / "nowhere") in one_line_error([*base, "--score", f"clip:{tmp_path / 'nowhere'}"], capsys)
    assert "'clip' is given twice" in one_line_error([*base, "--score", "clip", "--score", "clip"], capsys)
    assert not (tmp_path / "s").exists()


# -- summaries and comparisons, from manifests -------------------------------------------------------
def fixture_manifest(scores: dict[tuple[str, int, float], float]) -> dict:
    """A manifest of a guidance grid with the given (prompt, seed, guidance) → clip score."""
    items = [{"prompt": prompt, "negative_prompt": None, "seed": seed, "settings": {"steps": 4, "guidance": guidance},
              "media": f"/store/media/{prompt}-{seed}-{guidance}.png", "scores": {"clip": value}}
             for (prompt, seed, guidance), value in scores.items()]
    return {"model": "m", "family": "sdxl", "settings": {"steps": 4}, "grid": {"guidance": [3.0, 5.0]}, "items": items}


RUN_A = fixture_manifest({("cat", 0, 3.0): 20.0, ("cat", 1, 3.0): 22.0, ("dog", 0, 3.0): 10.0, ("dog", 1, 3.0): 12.0,
                          ("cat", 0, 5.0): 24.0, ("cat", 1, 5.0): 26.0, ("dog", 0, 5.0): 14.0, ("dog", 1, 5.0): 16.0})
RUN_B = fixture_manifest({("cat", 0, 3.0): 21.0, ("cat", 1, 3.0): 23.0, ("dog", 0, 3.0): 15.0, ("dog", 1, 3.0): 17.0,
                          ("cat", 0, 5.0): 30.0, ("cat", 1, 5.0): 32.0, ("dog", 0, 5.0): 14.0, ("dog", 1, 5.0): 16.0})


def test_the_summary_gives_mean_deviation_and_worst_prompts_per_grid_point():
    (low, high) = summarize(RUN_A)["clip"]
    assert (low["label"], low["count"], low["mean"], low["std"]) == ("guidance 3", 4, 16.0, pytest.approx(5.0990195))
    assert low["worst"] == [{"prompt": "dog", "score": 11.0}, {"prompt": "cat", "score": 21.0}]
    assert (high["label"], high["mean"]) == ("guidance 5", 20.0)


def test_compare_reports_per_setting_and_per_prompt_differences():
    comparison = compare_runs(RunManifest("a", RUN_A), RunManifest("b", RUN_B))
    assert [(row["label"], row["a"], row["b"], row["difference"]) for row in comparison.points] == [
        ("guidance 3", 16.0, 19.0, 3.0), ("guidance 5", 20.0, 23.0, 3.0)]
    assert [(row["prompt"], row["difference"]) for row in comparison.prompts] == [("cat", 3.5), ("dog", 2.5)]
    text = comparison.text()
    assert "guidance 3" in text and "3.000" in text and "3.500" in text


def test_stagediff_compare_prints_the_differences_and_writes_a_chart_per_run(tmp_path, capsys):
    for name, manifest in (("night-1", RUN_A), ("night-2", RUN_B)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))
    chart = tmp_path / "chart.png"
    assert main(["compare", str(tmp_path / "night-1/manifest.json"), str(tmp_path / "night-2/manifest.json"),
                 "--output", str(chart)]) == 0
    printed = capsys.readouterr().out
    assert "A = night-1, B = night-2" in printed and "guidance 5" in printed
    with Image.open(chart) as image:
        image.verify()
    pixels = np.asarray(Image.open(chart).convert("RGB"))
    from stagediff.charts import COLORS

    for color in COLORS[:2]:  # a line for each run
        assert (pixels == color).all(axis=-1).sum() > 50


def test_compare_reads_manifests_in_a_bucket(emulator, tmp_path, capsys):
    from gcs_emulator import BUCKET
    from stagediff import gcs

    for name, manifest in (("night-1", RUN_A), ("night-2", RUN_B)):
        gcs.filesystem().pipe_file(f"{BUCKET}/compare/runs/{name}/manifest.json", json.dumps(manifest).encode())
    assert main(["compare", f"gs://{BUCKET}/compare/runs/night-1/manifest.json",
                 f"gs://{BUCKET}/compare/runs/night-2/manifest.json", "--output", str(tmp_path / "c.png")]) == 0
    assert "A = night-1, B = night-2" in capsys.readouterr().out and (tmp_path / "c.png").is_file()


def test_the_score_command_scores_a_finished_batch(tiny_sdxl, tiny_clip, tmp_path, capsys):
    store = tmp_path / "store"
    generate(tiny_sdxl, store, "plain")
    capsys.readouterr()
    args = ["score", "--model", str(tiny_sdxl), *(a for p in PROMPTS for a in ("--prompt", p)), "--seeds", "0-1",
            "--steps", "1", "--height", "32", "--width", "32", "--store", str(store), "--score", f"clip:{tiny_clip}"]
    assert main(args) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line]
    assert len(printed) == 4 and all("/scores/clip/" in line and Path(line).is_file() for line in printed)
    assert not (store / "runs/plain/manifest.json").read_text().count('"scores"')  # the plain run's manifest stays


def test_compare_of_an_unscored_run_is_a_one_line_error(tmp_path, capsys):
    plain = {**RUN_A, "items": [{k: v for k, v in item.items() if k != "scores"} for item in RUN_A["items"]]}
    (tmp_path / "a.json").write_text(json.dumps(RUN_A))
    (tmp_path / "b.json").write_text(json.dumps(plain))
    assert "no scorer in common" in one_line_error(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")],
                                                   capsys)
    assert "no such file" in one_line_error(["compare", str(tmp_path / "a.json"), str(tmp_path / "c.json")], capsys)


def test_the_light_core_of_scoring_imports_no_torch():
    modules = "stagediff.scoring, stagediff.compare, stagediff.charts, stagediff.manifest, stagediff.scheduler, " \
              "stagediff.options, stagediff.plan, stagediff.contact_sheet, stagediff.trends"
    code = f"import sys, {modules}; heavy = [m for m in ('torch', 'jax', 'diffusers', 'transformers') if m in sys.modules]; " \
           "print(heavy); sys.exit(1 if heavy else 0)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout + result.stderr


# -- trends across scheduled runs ------------------------------------------------------------------------
def test_the_trend_chart_has_one_point_per_scored_run_of_the_sweep(tmp_path):
    import os

    from stagediff import charts
    from stagediff.store import Store
    from stagediff.trends import sweep_trend, trend_chart_png

    store = Store(str(tmp_path / "store"))
    nights = {"sweep-nightly-20261201-030000": RUN_A, "sweep-nightly-20261202-030000": RUN_B,
              "sweep-nightly-20261203-030000": RUN_A, "other-20261202": RUN_B}
    for number, (name, manifest) in enumerate(nights.items()):
        store.write_json(f"runs/{name}/manifest.json", manifest)
        os.utime(store.path(f"runs/{name}/manifest.json"), (1_800_000_000 + number * 86400,) * 2)
    store.write_json("runs/sweep-nightly-unscored/manifest.json", {**RUN_A, "items": []})

    points = sweep_trend(store, "sweep-nightly")
    assert [(point.run_name, point.scores) for point in points] == [
        ("sweep-nightly-20261201-030000", {"clip": 18.0}), ("sweep-nightly-20261202-030000", {"clip": 21.0}),
        ("sweep-nightly-20261203-030000", {"clip": 18.0})]

    png = trend_chart_png(points, "sweep-nightly")
    with Image.open(io.BytesIO(png)) as image:
        image.verify()
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    left, right = charts.MARGIN_LEFT, charts.WIDTH - charts.MARGIN_RIGHT
    top, bottom = charts.MARGIN_TOP, charts.HEIGHT - charts.MARGIN_BOTTOM
    x_low, x_high = charts._span(0, 2)
    y_low, y_high = charts._span(18.0, 21.0)
    for number, point in enumerate(points):  # a marker at each run's (run, score)
        x = round(left + (number - x_low) / (x_high - x_low) * (right - left))
        y = round(bottom - (point.scores["clip"] - y_low) / (y_high - y_low) * (bottom - top))
        assert (pixels[y - 2: y + 3, x - 2: x + 3] == charts.COLORS[0]).all(axis=-1).sum() >= 20


def test_a_score_of_media_decoded_again_from_other_latents_is_stale_and_scored_again(tiny_sdxl, tiny_clip, tmp_path):
    store = tmp_path / "store"
    plan = make_plan(request_of(tiny_sdxl, store, tiny_clip, guidance=None))
    for stage in ("encode", "denoise", "decode", "score"):
        stages.run_stage(stage, plan)
    victim = plan.items[1]
    latents = plan.store.read_tensors(victim.latents_path, victim.latents_key)["latents"]
    plan.store.write_tensors(victim.latents_path, {"latents": latents + 0.5}, victim.latents_key, victim.latents_inputs)
    before = snapshot(store)

    assert stages.run_stage("decode", plan).computed == 1
    assert stages.run_stage(SCORE, plan).computed == 1
    (task,) = [task for task in score_tasks(plan) if task.item is victim]
    changed = {path for path, mtime in snapshot(store).items() if before.get(path) != mtime}
    assert changed == {victim.media_path, task.path}


def test_gc_and_verify_look_after_score_files(tiny_sdxl, tiny_clip, tmp_path, capsys):
    """A run declares its score files (record and manifest): gc keeps them and deletes an orphan score
    file; verify reads score files and `--repair` removes a corrupt one, which the next run scores again."""
    store = tmp_path / "store"
    manifest = generate(tiny_sdxl, store, "kept", "--score", f"clip:{tiny_clip}")
    plan = make_plan(request_of(tiny_sdxl, store, tiny_clip, guidance=None))
    own = {task.path for task in score_tasks(plan)}
    assert own <= set(plan_paths(plan))
    assert {artifact_path(uri) for item in manifest["items"] for uri in item["score_files"].values()} == own

    template = json.loads((store / sorted(own)[0]).read_text())
    (store / "scores/clip/orphan.json").write_text(json.dumps({**template, "key": "orphan"}))
    corrupt = store / sorted(own)[1]
    corrupt.write_text('{"score": "not a number"')
    two_hours_ago = time.time() - 2 * 3600
    for path in store.rglob("*"):
        if path.is_file() and "runs" not in path.parts:
            os.utime(path, (two_hours_ago,) * 2)

    assert main(["gc", str(store), "--unreferenced", "--delete"]) == 0
    assert "unreferenced " + str(store / "scores/clip/orphan.json") in capsys.readouterr().out
    assert {str(p.relative_to(store)) for p in (store / "scores/clip").iterdir()} == own

    assert main(["verify", str(store), "--repair"]) == 0
    out = capsys.readouterr().out
    assert f"corrupt    {corrupt}  (removed)" in out and "14 artifacts checked, 1 corrupt" in out  # 2 embeddings, 4 latents, media, scores
    assert not corrupt.exists()
    assert stages.run_stage(SCORE, plan).computed == 1 and corrupt.exists()
