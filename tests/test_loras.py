"""LoRA adapters: stagediff with `--lora x:0.7` equals the diffusers pipeline with `load_lora_weights` and
adapter weight 0.7, on both backends; LoRAs are in the keys of exactly the stages they change; bad LoRAs
fail before any artifact with one line."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from helpers import run_all_stages, snapshot, stored_item
from reference import relative_error
from stagediff import stages
from stagediff.cli import main
from stagediff.plan import make_plan
from stagediff.request import Request, parse_lora

PROMPT, SEED, STEPS, SCALE = "a red cat", 3, 2, 0.7
CASES = {
    # tiny model, LoRA, pipeline, (height, width)
    "sdxl-diffusers-format": ("sdxl", "sdxl", StableDiffusionXLPipeline, (64, 64)),
    "sdxl-kohya-format": ("sdxl", "sdxl-kohya", StableDiffusionXLPipeline, (64, 64)),
    "flux1": ("flux1", "flux1", FluxPipeline, (32, 48)),
}


@functools.lru_cache(maxsize=None)
def expected_outputs(case: str, model: str, lora: str):
    """(latents, uint8 pixels) of the diffusers pipeline with the LoRA loaded by its own loader at SCALE."""
    _, _, pipeline_class, (height, width) = CASES[case]
    pipe = pipeline_class.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora, adapter_name="evaluated")
    pipe.set_adapters(["evaluated"], adapter_weights=[SCALE])
    call = dict(prompt=PROMPT, num_inference_steps=STEPS, height=height, width=width)
    latents = pipe(generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent", **call).images
    pixels = pipe(generator=torch.Generator("cpu").manual_seed(SEED), output_type="np", **call).images
    return latents, (np.asarray(pixels[0]) * 255).round().astype(np.uint8)


@pytest.mark.parametrize("backend", ["torch", "torchax"])
@pytest.mark.parametrize("case", list(CASES))
def test_latents_and_pixels_equal_the_diffusers_pipeline_with_the_lora(tiny_models, tiny_loras, tmp_path, case, backend):
    tiny, lora, _, (height, width) = CASES[case]
    model = tiny_models(tiny)
    request = Request(model=str(model), prompts=[PROMPT], seeds=[SEED], steps=STEPS, height=height, width=width,
                      store=str(tmp_path), backend=backend, loras=[f"{tiny_loras(lora)}:{SCALE}"])
    run_all_stages(request)
    expected_latents, expected_pixels = expected_outputs(case, str(model), str(tiny_loras(lora)))
    latents, pixels = stored_item(request, PROMPT, SEED)
    assert relative_error(latents, expected_latents) < 1e-3
    assert np.abs(pixels.astype(int) - expected_pixels.astype(int)).max() <= 2


def test_the_lora_changes_the_output(tiny_models, tiny_loras, tmp_path):
    """The comparisons above would pass for a LoRA that changes nothing: this one does, at its scale."""
    model = tiny_models("flux1")
    options = dict(model=str(model), prompts=[PROMPT], seeds=[SEED], steps=1, height=32, width=48, store=str(tmp_path))
    with_lora = Request(**options, loras=[f"{tiny_loras('flux1')}:{SCALE}"])
    run_all_stages(with_lora)
    run_all_stages(Request(**options))
    assert relative_error(stored_item(with_lora, PROMPT, SEED)[0], stored_item(Request(**options), PROMPT, SEED)[0]) > 1e-2


def test_a_fused_lora_leaves_plain_modules_for_the_compiler(tiny_models, tiny_loras, tmp_path):
    from peft.tuners.tuners_utils import BaseTunerLayer

    request = Request(model=str(tiny_models("sdxl")), prompts=[PROMPT], seeds=[0], store=str(tmp_path),
                      loras=[f"{tiny_loras('sdxl')}:0.5"])
    plan = make_plan(request)
    unet = stages.stage_pipeline(plan, stages.DENOISE, plan.points[0].loras).unet
    clip = stages.stage_pipeline(plan, stages.ENCODE, plan.points[0].loras).text_encoder
    assert not [name for name, module in [*unet.named_modules(), *clip.named_modules()] if isinstance(module, BaseTunerLayer)]
    stages.release()


def keys_of(plan):
    return [(item.embedding.key, item.latents_key, item.media_key) for item in plan.items]


def test_a_denoiser_only_lora_changes_latents_keys_but_not_embeddings_keys(tiny_models, tiny_loras, tmp_path):
    model, lora = str(tiny_models("sdxl")), tiny_loras("sdxl-unet")
    base = make_plan(Request(model=model, prompts=[PROMPT], seeds=[0], store=str(tmp_path)))
    half, full = (make_plan(Request(model=model, prompts=[PROMPT], seeds=[0], store=str(tmp_path),
                                    loras=[f"{lora}:{scale}"])) for scale in (0.5, 1.0))
    assert half.loras[0].components == ("unet",)
    assert keys_of(base)[0][0] == keys_of(half)[0][0] == keys_of(full)[0][0]
    assert len({keys_of(plan)[0][1] for plan in (base, half, full)}) == 3


def test_a_lora_with_text_encoder_weights_changes_the_embeddings_key(tiny_models, tiny_loras, tmp_path):
    model, lora = str(tiny_models("sdxl")), tiny_loras("sdxl")
    plans = [make_plan(Request(model=model, prompts=[PROMPT], seeds=[0], store=str(tmp_path), loras=loras))
             for loras in ([], [f"{lora}:0.5"], [f"{lora}:1"])]
    assert plans[1].loras[0].components == ("unet", "text_encoder")
    assert len({keys_of(plan)[0][0] for plan in plans}) == 3


def test_scale_zero_is_the_base_model(tiny_models, tiny_loras, tmp_path):
    model = str(tiny_models("sdxl"))
    base = make_plan(Request(model=model, prompts=[PROMPT], seeds=[0, 1], store=str(tmp_path)))
    zero = make_plan(Request(model=model, prompts=[PROMPT], seeds=[0, 1], store=str(tmp_path),
                             loras=[f"{tiny_loras('sdxl')}:0"]))
    assert keys_of(zero) == keys_of(base)


def test_a_gs_lora_has_the_keys_of_the_same_file_on_disk(tiny_models, tiny_loras, tmp_path, emulator, monkeypatch):
    from gcs_emulator import BUCKET
    from stagediff import gcs

    monkeypatch.setenv(gcs.MODEL_CACHE_VARIABLE, str(tmp_path / "cache"))
    lora = tiny_loras("flux1")
    gcs.filesystem().put_file(str(lora), f"{BUCKET}/loras/style.safetensors")
    options = dict(model=str(tiny_models("flux1")), prompts=[PROMPT], seeds=[0], store=str(tmp_path / "store"))
    from_bucket = make_plan(Request(**options, loras=[f"gs://{BUCKET}/loras/style.safetensors:0.5"]))
    assert keys_of(from_bucket) == keys_of(make_plan(Request(**options, loras=[f"{lora}:0.5"])))
    assert (tmp_path / "cache" / BUCKET / "loras/style.safetensors").read_bytes() == lora.read_bytes()


def test_a_hugging_face_lora_is_downloaded_and_identified_by_its_blob(tiny_models, tiny_loras, tmp_path):
    from hub_emulator import HubEmulator

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "pytorch_lora_weights.safetensors").write_bytes(tiny_loras("flux1").read_bytes())
    hub = HubEmulator({"org/style-lora": repo})
    try:
        script = ("import sys; from stagediff.plan import make_plan; from stagediff.request import Request; "
                  f"p = make_plan(Request(model={str(tiny_models('flux1'))!r}, prompts=['a cat'], seeds=[0], "
                  f"store={str(tmp_path / 'store')!r}, loras=sys.argv[1:])); print(p.items[0].latents_inputs['loras'])")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "HF_ENDPOINT": hub.url,
               "HF_HUB_CACHE": str(tmp_path / "hub-cache"), "HF_HUB_DISABLE_XET": "1"}
        printed = [subprocess.run([sys.executable, "-c", script, source], capture_output=True, text=True, env=env)
                   for source in ("org/style-lora:0.5", "hf://org/style-lora/pytorch_lora_weights.safetensors:0.5")]
    finally:
        hub.stop()
    digest = "hf:" + hashlib.sha256(tiny_loras("flux1").read_bytes()).hexdigest()
    for process in printed:
        assert process.returncode == 0, process.stderr[-2000:]
        assert process.stdout.strip() == str([{"lora": digest, "scale": 0.5}])
    assert hub.downloads == ["org/style-lora/pytorch_lora_weights.safetensors"]


@pytest.mark.parametrize("text, expected", [
    ("style.safetensors", ("style.safetensors", 1.0)),
    ("style.safetensors:0.7", ("style.safetensors", 0.7)),
    ("gs://bucket/loras/style.safetensors:-0.5", ("gs://bucket/loras/style.safetensors", -0.5)),
    ("gs://bucket/loras/style.safetensors", ("gs://bucket/loras/style.safetensors", 1.0)),
    ("hf://org/name/style.safetensors:2", ("hf://org/name/style.safetensors", 2.0)),
    ({"source": "org/name", "scale": 0.25}, ("org/name", 0.25)),
])
def test_lora_sources_and_scales_parse(text, expected):
    parsed = parse_lora(text)
    assert (parsed["source"], parsed["scale"]) == expected


def wrong_shape_lora(lora: Path, path: Path) -> Path:
    """The LoRA with one A matrix of another input size, as a LoRA for another model size has."""
    weights = load_file(lora)
    name = next(key for key in weights if key.startswith("unet.") and "lora_A" in key)
    weights[name] = torch.zeros(weights[name].shape[0], weights[name].shape[1] + 3)
    save_file(weights, path)
    return path


BAD_LORAS = {
    "pickle file": (lambda loras, t: str(t / "lora.bin"), "only .safetensors LoRA files are loaded"),
    "pickle named .safetensors": (lambda loras, t: str(t / "pickle.safetensors"), "not a LoRA file diffusers reads"),
    "missing file": (lambda loras, t: str(t / "none.safetensors"), "none.safetensors: no such file"),
    "LoRA for another family": (lambda loras, t: str(loras("flux1")), "none of its weights is for a sdxl model's unet"),
    "LoRA for another model size": (lambda loras, t: str(wrong_shape_lora(loras("sdxl"), t / "wrong.safetensors")),
                                    "the LoRA's A matrix is"),
    "scale not a number": (lambda loras, t: {"source": str(loras("sdxl")), "scale": "strong"}, "the scale must be a number"),
}


@pytest.mark.parametrize("case", BAD_LORAS, ids=list(BAD_LORAS))
def test_a_bad_lora_fails_with_one_line_and_no_artifacts(case, tiny_sdxl, tiny_loras, tmp_path, capsys):
    torch.save({"unet.x.lora_A.weight": torch.zeros(1)}, tmp_path / "lora.bin")
    torch.save({"unet.x.lora_A.weight": torch.zeros(1)}, tmp_path / "pickle.safetensors")
    make_lora, expected = BAD_LORAS[case]
    lora = make_lora(tiny_loras, tmp_path)
    before = snapshot(tmp_path)
    if isinstance(lora, dict):
        # Flow parameters take a LoRA as an object.
        from stagediff.errors import StagediffError

        with pytest.raises(StagediffError, match=expected):
            Request(model=str(tiny_sdxl), prompts=[PROMPT], seeds=[0], loras=[lora])
        return
    code = main(["generate", "--model", str(tiny_sdxl), "--prompt", PROMPT, "--seed", "0", "--lora", lora,
                 "--store", str(tmp_path / "store")])
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith("stagediff: error: --lora ") and error.count("\n") == 1, error
    assert expected in error
    assert snapshot(tmp_path) == before


def test_manifest_and_media_record_the_loras(tiny_sdxl, tiny_loras, tmp_path):
    from stagediff.media import read_png_metadata

    lora = tiny_loras("sdxl-unet")
    assert main(["generate", "--model", str(tiny_sdxl), "--prompt", PROMPT, "--seed", "0", "--steps", "1",
                 "--lora", f"{lora}:0.5", "--store", str(tmp_path), "--run-name", "lora"]) == 0
    manifest = json.loads((tmp_path / "runs/lora/manifest.json").read_text())
    digest = manifest["loras"][0]["digest"]
    assert manifest["loras"] == [{"source": str(lora), "digest": digest, "components": ["unet"], "scales": [0.5]}]
    assert manifest["items"][0]["loras"] == [{"source": str(lora), "scale": 0.5}]
    metadata = read_png_metadata(Path(manifest["items"][0]["media"]).read_bytes())
    assert metadata["loras"] == [{"source": str(lora), "scale": 0.5, "digest": digest}]
