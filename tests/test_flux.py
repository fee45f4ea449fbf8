"""FLUX.1, FLUX.2 and FLUX.2-klein end to end: stagediff equals the diffusers pipelines on both
backends, embeddings serve every seed, each stage loads only what it needs, bad input fails early."""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline, FluxPipeline

from helpers import run_all_stages, stored_item
from reference import reference_outputs, reference_pipeline, relative_error
from stagediff import stages
from stagediff.errors import StagediffError
from stagediff.plan import make_plan
from stagediff.request import Request

PROMPT = "a red cat"
SEEDS = (3, 7)
STEPS = 2
HEIGHT, WIDTH = 32, 48
PACKED = (1, (HEIGHT // 16) * (WIDTH // 16), 16)
KLEIN_UNPACKED = (1, 4, HEIGHT // 8, WIDTH // 8)


@dataclass(frozen=True)
class Case:
    """One tiny model and the options stagediff and the diffusers pipeline both get."""

    tiny: str
    pipeline: type
    latents_shape: tuple
    guidance: float | None = None
    negative_prompt: str | None = None
    extras: dict = field(default_factory=dict)
    pipeline_kwargs: dict = field(default_factory=dict)


CASES = {
    "flux1-dev": Case("flux1", FluxPipeline, PACKED, guidance=5.0),
    "flux1-dev-true-cfg": Case(
        "flux1", FluxPipeline, PACKED, guidance=5.0, negative_prompt="blurry", extras={"true_cfg": 2.0},
        pipeline_kwargs={"negative_prompt": "blurry", "true_cfg_scale": 2.0},
    ),
    # No guidance given: schnell and distilled klein ignore it, so the pipelines' defaults must agree.
    "flux1-schnell": Case("flux1-schnell", FluxPipeline, PACKED),
    "flux2": Case("flux2", Flux2Pipeline, PACKED, guidance=2.5),
    "flux2-klein": Case("flux2-klein", Flux2KleinPipeline, KLEIN_UNPACKED),
    "flux2-klein-base": Case("flux2-klein-base", Flux2KleinPipeline, KLEIN_UNPACKED, guidance=3.0),
}
TINY_MODELS = ("flux1", "flux1-schnell", "flux2", "flux2-klein", "flux2-klein-base")


def request_for(case: Case, folder, store, backend="torch", **changes) -> Request:
    options = dict(
        model=str(folder), prompts=[PROMPT], seeds=list(SEEDS), negative_prompt=case.negative_prompt,
        steps=STEPS, guidance=case.guidance, height=HEIGHT, width=WIDTH, store=str(store), backend=backend,
        extras=case.extras,
    )
    return Request(**{**options, **changes})


@functools.lru_cache(maxsize=None)
def expected_outputs(case_name: str, folder: str, seed: int):
    case = CASES[case_name]
    guidance = {} if case.guidance is None else {"guidance_scale": case.guidance}
    return reference_outputs(
        case.pipeline, folder, seed, prompt=PROMPT, num_inference_steps=STEPS, height=HEIGHT, width=WIDTH,
        **guidance, **case.pipeline_kwargs,
    )


@pytest.mark.parametrize("backend", ["torch", "torchax"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_latents_and_pixels_equal_the_diffusers_pipeline(tiny_models, tmp_path, case_name, backend):
    case = CASES[case_name]
    folder = tiny_models(case.tiny)
    request = request_for(case, folder, tmp_path, backend)
    run_all_stages(request)
    for seed in SEEDS:
        expected_latents, expected_pixels = expected_outputs(case_name, str(folder), seed)
        latents, pixels = stored_item(request, PROMPT, seed)
        assert latents.shape == case.latents_shape == expected_latents.shape
        assert relative_error(latents, expected_latents) < 1e-3
        assert np.abs(pixels.astype(int) - expected_pixels[0].astype(int)).max() <= 2


@pytest.mark.parametrize("tiny", TINY_MODELS)
def test_one_embeddings_file_serves_every_seed(tiny_models, tmp_path, tiny):
    request = Request(
        model=str(tiny_models(tiny)), prompts=[PROMPT], seeds=list(SEEDS), steps=1, height=HEIGHT, width=WIDTH,
        store=str(tmp_path),
    )
    plan = make_plan(request)
    encoded = stages.encode(plan)
    denoised = stages.denoise(plan)
    assert (encoded.computed, denoised.computed) == (1, len(SEEDS))
    assert len(list((tmp_path / "embeddings").rglob("*.safetensors"))) == 1
    assert stages.encode(make_plan(request)).computed == 0


@pytest.mark.parametrize("tiny", TINY_MODELS)
@pytest.mark.parametrize("size", [dict(height=40), dict(width=24)])
def test_size_not_a_multiple_of_16_fails_before_any_artifact(tiny_models, tmp_path, tiny, size):
    store = tmp_path / "store"
    request = Request(model=str(tiny_models(tiny)), prompts=[PROMPT], seeds=[0], store=str(store), **size)
    name, value = next(iter(size.items()))
    with pytest.raises(StagediffError, match=f"--{name} {value} must be a positive multiple of 16"):
        make_plan(request)
    assert not store.exists()


def test_flux2_dev_rejects_a_negative_prompt(tiny_models, tmp_path):
    request = Request(model=str(tiny_models("flux2")), prompts=[PROMPT], seeds=[0], negative_prompt="blurry", store=str(tmp_path))
    with pytest.raises(StagediffError, match="--negative-prompt is not supported by flux2"):
        make_plan(request)


def test_true_cfg_below_one_is_rejected(tiny_models, tmp_path):
    request = Request(model=str(tiny_models("flux1")), prompts=[PROMPT], seeds=[0], extras={"true_cfg": 0.5}, store=str(tmp_path))
    with pytest.raises(StagediffError, match="--true-cfg 0.5"):
        make_plan(request)


def test_an_option_of_another_family_is_rejected(tiny_models, tmp_path):
    request = Request(model=str(tiny_models("flux2")), prompts=[PROMPT], seeds=[0], extras={"true_cfg": 2.0}, store=str(tmp_path))
    with pytest.raises(StagediffError, match="--true-cfg is not an option of flux2 models"):
        make_plan(request)


def test_klein_base_runs_cfg_against_a_given_negative_prompt(tiny_models, tmp_path):
    folder = tiny_models("flux2-klein-base")
    request = request_for(CASES["flux2-klein-base"], folder, tmp_path, negative_prompt="blurry", seeds=[SEEDS[0]])
    run_all_stages(request)
    pipe = reference_pipeline(Flux2KleinPipeline, str(folder))
    negative_embeds, _ = pipe.encode_prompt("blurry", device=torch.device("cpu"))
    expected, _ = reference_outputs(
        Flux2KleinPipeline, folder, SEEDS[0], prompt=PROMPT, negative_prompt_embeds=negative_embeds,
        num_inference_steps=STEPS, height=HEIGHT, width=WIDTH, guidance_scale=3.0,
    )
    latents, _ = stored_item(request, PROMPT, SEEDS[0])
    assert relative_error(latents, expected) < 1e-3
    # Not the output with the pipeline's empty negative prompt (torch runs reproduce it bit for bit).
    assert relative_error(latents, expected_outputs("flux2-klein-base", str(folder), SEEDS[0])[0]) > 1e-4


STAGE_COMPONENTS = {
    "flux1": {
        "encode": ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
        "denoise": ("scheduler", "transformer"),
        "decode": ("vae",),
    },
    "flux2": {"encode": ("text_encoder", "tokenizer"), "denoise": ("scheduler", "transformer"), "decode": ("vae",)},
    # Flux2KleinPipeline de-normalises its output latents with the VAE's batch-norm statistics.
    "flux2-klein": {
        "encode": ("text_encoder", "tokenizer"),
        "denoise": ("scheduler", "transformer", "vae"),
        "decode": ("vae",),
    },
}


@pytest.mark.parametrize("tiny", list(STAGE_COMPONENTS))
def test_each_stage_loads_only_its_own_components(tiny_models, tmp_path, tiny):
    request = Request(
        model=str(tiny_models(tiny)), prompts=[PROMPT], seeds=[0], steps=1, height=HEIGHT, width=WIDTH, store=str(tmp_path)
    )
    plan = make_plan(request)
    stages.release()
    for run in (stages.encode, stages.denoise, stages.decode):
        result = run(plan)
        assert stages.loaded_components(result.stage) == STAGE_COMPONENTS[tiny][result.stage]
        stages.release(result.stage)


def test_bfloat16_encodes_with_bfloat16_text_encoders(tiny_models, tmp_path):
    request = Request(model=str(tiny_models("flux1")), prompts=[PROMPT], seeds=[0], dtype="bfloat16", store=str(tmp_path))
    plan = make_plan(request)
    stages.encode(plan)
    stages.release("encode")
    embedding = plan.embeddings[0]
    tensors = plan.store.read_tensors(embedding.path, embedding.key)
    assert {name: tensor.dtype for name, tensor in tensors.items()} == {
        "prompt_embeds": torch.bfloat16,
        "pooled_prompt_embeds": torch.bfloat16,
    }


def test_torchax_compiles_the_flux_transformer_once_per_shape(tiny_models, tmp_path):
    request = request_for(CASES["flux1-dev"], tiny_models("flux1"), tmp_path, "torchax", steps=1)
    plan = make_plan(request)
    stages.encode(plan)
    denoised = stages.denoise(plan)
    assert (denoised.computed, denoised.compiles) == (len(SEEDS), 1)


def pixtral_processor_layout(folder, destination):
    """A copy of a tiny FLUX.2 checkpoint whose tokenizer folder is laid out as FLUX.2-dev's: a
    PixtralProcessor (which needs torchvision) with the chat template in the processor's files."""
    shutil.copytree(folder, destination)
    index_path = destination / "model_index.json"
    index = json.loads(index_path.read_text())
    index["tokenizer"] = ["transformers", "PixtralProcessor"]
    index_path.write_text(json.dumps(index))
    tokenizer = destination / "tokenizer"
    template = (tokenizer / "chat_template.jinja").read_text()
    (tokenizer / "chat_template.jinja").unlink()
    (tokenizer / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    (tokenizer / "processor_config.json").write_text(
        json.dumps({"processor_class": "PixtralProcessor", "patch_size": 16, "spatial_merge_size": 1})
    )
    return destination


def test_flux2_dev_encodes_from_a_pixtral_processor_folder_without_torchvision(tiny_models, tmp_path):
    folder = tiny_models("flux2")
    processor_folder = pixtral_processor_layout(folder, tmp_path / "processor-layout")
    embeddings = []
    for model, store in ((folder, tmp_path / "a"), (processor_folder, tmp_path / "b")):
        plan = make_plan(Request(model=str(model), prompts=[PROMPT], seeds=[0], store=str(store)))
        stages.encode(plan)
        embeddings.append(plan.store.read_tensors(plan.embeddings[0].path, plan.embeddings[0].key)["prompt_embeds"])
    stages.release("encode")
    assert torch.equal(embeddings[0], embeddings[1])
