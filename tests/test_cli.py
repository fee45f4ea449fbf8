"""The `stagediff` command: a real generation, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from helpers import one_line_error, snapshot
from stagediff.cli import main
from stagediff.confinement import ALLOWED_ROOTS_VARIABLE
from stagediff.media import read_png_metadata


def stagediff(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run([sys.executable, "-m", "stagediff.cli", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_generate_writes_pngs_and_a_manifest(tiny_sdxl, tmp_path):
    process = stagediff(
        "generate", "--model", str(tiny_sdxl), "--prompt", "a red cat", "--prompt", "a blue dog",
        "--seed", "0", "--seed", "1", "--steps", "2", "--store", "store", "--manifest", "out/manifest.json",
        "--run-name", "first", cwd=tmp_path,
    )
    assert process.returncode == 0, process.stderr

    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest == json.loads((tmp_path / "store/runs/first/manifest.json").read_text())
    assert manifest["family"] == "sdxl"
    assert [(i["prompt"], i["seed"]) for i in manifest["items"]] == [
        ("a red cat", 0), ("a red cat", 1), ("a blue dog", 0), ("a blue dog", 1)
    ]
    for item in manifest["items"]:
        media = tmp_path / "store" / item["media"] if not os.path.isabs(item["media"]) else Path(item["media"])
        assert str(media) in process.stdout
        with Image.open(media) as image:
            assert image.size == (128, 128)
        metadata = read_png_metadata(media.read_bytes())
        assert (metadata["prompt"], metadata["seed"], metadata["steps"]) == (item["prompt"], item["seed"], 2)
        assert metadata["model"] == str(tiny_sdxl)


def _args(model, store, *extra):
    return ["generate", "--model", str(model), "--prompt", "a cat", "--seed", "0", "--store", str(store), *extra]


@pytest.fixture
def folder_without_index(tmp_path):
    (tmp_path / "no-index").mkdir()
    return tmp_path / "no-index"


@pytest.fixture
def unsupported_model(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other/model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    return tmp_path / "other"


BAD_INPUTS = {
    "missing model path": (lambda m, t: ["--model", str(t / "nowhere")], "nowhere"),
    "folder without model_index.json": (lambda m, t: ["--model", str(t / "no-index")], "no model_index.json"),
    "unsupported family": (lambda m, t: ["--model", str(t / "other")], "KandinskyPipeline"),
    "steps below one": (lambda m, t: ["--steps", "0"], "--steps 0"),
    "negative seed": (lambda m, t: ["--seed", "-1"], "--seed -1"),
    "non-integer seed": (lambda m, t: ["--seed", "1.5"], "'1.5'"),
    "empty prompt": (lambda m, t: ["--prompt", "  "], "--prompt '  '"),
    "height not a multiple of the VAE factor": (lambda m, t: ["--height", "100"], "--height 100"),
    "unwritable store": (lambda m, t: ["--store", str(t / "a-file/store")], "a-file/store is not writable"),
    "run name leaving the store": (lambda m, t: ["--run-name", "../../escape"], "--run-name '../../escape'"),
    "unknown backend": (lambda m, t: ["--backend", "gpu"], "invalid choice: 'gpu'"),
    "mesh on the torch backend": (lambda m, t: ["--backend", "torch", "--mesh", "tp=8"], "--mesh tp=8 needs --backend torchax"),
    "mesh the devices do not fit": (lambda m, t: ["--backend", "torchax", "--mesh", "tp=3"], "needs 3 devices"),
    "seed range backwards": (lambda m, t: ["--seeds", "9-2"], "--seeds '9-2'"),
    "seed neither a number nor a range": (lambda m, t: ["--seeds", "0..9"], "--seed '0..9'"),
    "missing prompt file": (lambda m, t: ["--prompt-file", str(t / "none.txt")], "none.txt: no such file"),
    "empty prompt file": (lambda m, t: ["--prompt-file", str(t / "a-file")], "holds no prompt"),
    "prompt file with a bad JSONL line": (lambda m, t: ["--prompt-file", str(t / "bad.jsonl")], "bad.jsonl line 2"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_fails_with_one_line_and_no_artifacts(case, tiny_sdxl, tmp_path, folder_without_index, unsupported_model, capsys):
    (tmp_path / "a-file").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a cat"}\n{"text": "a dog"}\n')
    make_args, expected = BAD_INPUTS[case]
    args = _args(tiny_sdxl, tmp_path / "store") + make_args(tiny_sdxl, tmp_path)
    before = snapshot(tmp_path)
    assert expected in one_line_error(args, capsys)
    assert snapshot(tmp_path) == before  # nothing written, in the store or anywhere else


@pytest.mark.parametrize("where", ["store", "store-through-dotdot", "manifest", "model"])
def test_a_worker_with_allowed_roots_refuses_what_lies_outside_them(where, tiny_sdxl, tmp_path, monkeypatch, capsys):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    monkeypatch.setenv(ALLOWED_ROOTS_VARIABLE, f"{allowed},{tiny_sdxl},gs://some-bucket/stagediff")
    options = {"store": str(allowed / "store"), "manifest": str(allowed / "manifest.json"), "model": str(tiny_sdxl)}
    outside = {"store": str(tmp_path / "elsewhere"), "store-through-dotdot": f"{allowed}/../elsewhere",
               "manifest": str(tmp_path / "manifest.json"), "model": str(tmp_path)}
    options[where.split("-")[0]] = outside[where]
    args = ["generate", "--prompt", "a cat", "--seed", "0", *(f"--{k}={v}" for k, v in options.items())]
    before = snapshot(tmp_path)
    assert main(args) == 2
    error = capsys.readouterr().err
    assert f"{outside[where]} is outside the roots this worker allows" in error and error.count("\n") == 1
    assert snapshot(tmp_path) == before


def test_bad_input_exits_without_traceback(tmp_path):
    process = stagediff(*_args(tmp_path / "nowhere", tmp_path / "store"), cwd=tmp_path)
    assert process.returncode == 2
    assert process.stderr.strip().splitlines() == [f"stagediff: error: model not found: {tmp_path / 'nowhere'} (no such folder)"]


def test_tiny_model_rejects_an_unknown_scale(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main(["tiny-model", "wan", str(tmp_path / "model"), "--scale", "huge"]))
    assert exit_info.value.code == 2
    assert "unknown scale 'huge'" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("module, model_class", [("flux1", "FluxTransformer2DModel"), ("flux2", "Flux2Transformer2DModel"),
                                                 ("wan", "WanTransformer3DModel")])
def test_small_scale_denoisers_are_benchmark_sized(module, model_class):
    """The `small` scale promises denoisers of 40-120M parameters (built on the meta device: no memory)."""
    import importlib

    import diffusers
    import torch

    sizes = importlib.import_module(f"stagediff.tiny.{module}").TRANSFORMER_SCALES
    with torch.device("meta"):
        small = getattr(diffusers, model_class)(**sizes["small"])
    parameters = sum(p.numel() for p in small.parameters())
    assert 40e6 < parameters < 120e6, parameters


@pytest.mark.parametrize("module, published", [("sdxl", 2_567_463_684), ("flux1", 11_901_408_320), ("wan", 1_418_996_800)])
def test_full_scale_denoisers_are_the_real_architectures(module, published):
    """`full` is the real denoiser: exactly the published checkpoints' parameter counts (SDXL base UNet,
    FLUX.1-dev transformer, Wan 2.1 T2V 1.3B), built on the meta device."""
    import importlib

    import torch

    with torch.device("meta"):
        denoiser = importlib.import_module(f"stagediff.tiny.{module}").denoiser("full")
    assert sum(p.numel() for p in denoiser.parameters()) == published


@pytest.mark.parametrize("module, published", [
    ("sdxl", (123_060_480, 694_659_840)), ("flux1", (123_060_480, 4_762_310_656)), ("wan", (5_680_910_336,)),
])
def test_full_scale_text_encoders_are_the_real_ones(module, published, tmp_path):
    """`full` text encoders have the published parameter counts (CLIP ViT-L, OpenCLIP bigG with its
    projection, T5-XXL and UMT5-XXL encoders), built on the meta device."""
    import importlib

    import torch

    from stagediff.tiny.tokenizers import save_t5_tokenizer

    t5_tokenizer = () if module == "sdxl" else (save_t5_tokenizer(tmp_path),)
    with torch.device("meta"):
        encoders = importlib.import_module(f"stagediff.tiny.{module}").text_encoders("full", *t5_tokenizer)
    assert tuple(sum(p.numel() for p in encoder.parameters()) for encoder in encoders) == published


def test_full_scale_is_refused_for_families_it_does_not_cover(tmp_path, capsys):
    assert main(["tiny-model", "flux2", str(tmp_path / "model"), "--scale", "full"]) == 2
    assert "scale 'full' is not built for 'flux2'" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


def test_cli_options_and_flow_parameters_are_one_table():
    """Every generation option is a `generate` command flag and a parameter of every generation flow
    (snake_case, lists plural), and the sweep flow takes all of them but the seeds it builds."""
    import inspect

    from flows.generate import generate
    from flows.stages import decode, denoise, encode
    from flows.sweep import sweep
    from stagediff.cli import build_parser
    from stagediff.options import GENERATION_OPTIONS, RUN_OPTIONS

    names = {option.name for option in GENERATION_OPTIONS + RUN_OPTIONS}
    generate_command = build_parser()._subparsers._group_actions[0].choices["generate"]
    assert {action.dest for action in generate_command._actions} - {"help"} == names
    assert names <= set(inspect.signature(generate.fn).parameters)
    generation = {option.name for option in GENERATION_OPTIONS}
    for flow in (encode, denoise, decode):  # a stage flow runs one unit: the options, and the unit's keys
        assert set(inspect.signature(flow.fn).parameters) == generation | {"keys"}
    sweep_parameters = set(inspect.signature(sweep.fn).parameters)
    assert names - {"seeds"} <= sweep_parameters and "seeds" not in sweep_parameters


def test_seed_ranges_and_prompt_files_give_the_items_of_the_flags(tiny_sdxl, tmp_path, emulator):
    """`--seeds 0-2 --seed 7` and prompt files (text, JSONL with a negative prompt of its own, gs://)
    plan the same items as the flags they stand for."""
    from gcs_emulator import BUCKET
    from stagediff import gcs
    from stagediff.cli import build_parser
    from stagediff.options import request_from_options
    from stagediff.plan import make_plan

    (tmp_path / "prompts.txt").write_text("a red cat\n\n  a blue dog  \n")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a red cat"}\n{"prompt": "a blue dog", "negative_prompt": "blurry"}\n')
    gcs.filesystem().pipe_file(f"{BUCKET}/prompts.txt", (tmp_path / "prompts.txt").read_bytes())

    def items(*args):
        options = vars(build_parser().parse_args(["generate", "--model", str(tiny_sdxl), "--store", str(tmp_path), *args]))
        return [(i.prompt, i.embedding.negative_prompt, i.seed) for i in make_plan(request_from_options(options)).items]

    flags = items("--prompt", "a red cat", "--prompt", "a blue dog", "--seed", "0", "--seed", "1", "--seed", "2", "--seed", "7")
    assert len(flags) == 8
    assert items("--prompt-file", str(tmp_path / "prompts.txt"), "--seeds", "0-2", "--seed", "7") == flags
    assert items("--prompt-file", f"gs://{BUCKET}/prompts.txt", "--seeds", "0-2", "--seeds", "7") == flags
    assert items("--prompt", "a red cat", "--prompt-file", str(tmp_path / "prompts.txt"), "--seeds", "0-2",
                 "--seed", "7") == flags  # a prompt given twice is one prompt
    with_negatives = items("--prompt-file", str(tmp_path / "prompts.jsonl"), "--seeds", "0-2", "--seed", "7")
    assert [negative for _, negative, _ in with_negatives] == [None] * 4 + ["blurry"] * 4
