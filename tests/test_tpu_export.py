"""TPU readiness without a TPU: every program the TPU path compiles — each family's denoiser step with
the flash kernel, and its VAE decode — lowered for TPU (`jax.export`, platforms=["tpu"]) at real shapes
with the real-size modules, built on the meta device (shapes only, no memory). A lowering error (a
Pallas block that Mosaic refuses, an op XLA:TPU lacks, a dtype mix-up) fails here, not on a TPU VM.

The denoiser's arguments are written out per family (as the pipeline calls it at real sizes); a test
checks that, at the tiny model's sizes, they are exactly what stagediff's denoise passes the model."""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import pytest
import torch

from stagediff import stages
from stagediff.decoding import CausalStep, DECODER_STAND_INS
from stagediff.plan import make_plan
from stagediff.request import Request
from stagediff.tiny import flux1, flux2, sdxl, wan
from tpu_ops.attention import FAMILY_ATTENTION, AttentionConfig
from tpu_ops.compiled_module import Flattened, image_input_spec
from tpu_ops.export import export_call
from tpu_ops.mesh import make_mesh
from tpu_ops.sharding import RULES

BF16, F32, I64 = torch.bfloat16, torch.float32, torch.int64
TEXT_TOKENS = 512
"""The text length FLUX and Wan pipelines pad prompts to; SDXL's CLIP encoders use 77."""


def meta(*shape, dtype=BF16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


# -- the denoiser's call per family: (config, batch, height, width, frames, dtype) -> (args, kwargs) --
def sdxl_call(config, batch, height, width, frames, dtype):
    items = 2 * batch  # CFG: uncond and cond in one batch
    text_embeds = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return (meta(items, 4, height // 8, width // 8, dtype=dtype), meta(dtype=F32)), dict(
        encoder_hidden_states=meta(items, 77, config.cross_attention_dim, dtype=dtype), timestep_cond=None,
        cross_attention_kwargs=None,
        added_cond_kwargs={"text_embeds": meta(items, text_embeds, dtype=dtype), "time_ids": meta(items, 6, dtype=dtype)},
        return_dict=False,
    )


def flux_latents(config, batch, tokens, dtype) -> dict:
    """The arguments FLUX.1 and FLUX.2 pipelines both pass first: packed latents, timestep, guidance."""
    return dict(hidden_states=meta(batch, tokens, config.in_channels, dtype=dtype), timestep=meta(batch, dtype=dtype),
                guidance=meta(batch, dtype=F32) if config.guidance_embeds else None)


def flux1_call(config, batch, height, width, frames, dtype):
    tokens = (height // 16) * (width // 16)
    return (), dict(
        **flux_latents(config, batch, tokens, dtype), pooled_projections=meta(batch, config.pooled_projection_dim, dtype=dtype),
        encoder_hidden_states=meta(batch, TEXT_TOKENS, config.joint_attention_dim, dtype=dtype),
        txt_ids=meta(TEXT_TOKENS, 3, dtype=dtype), img_ids=meta(tokens, 3, dtype=dtype), joint_attention_kwargs={},
        return_dict=False,
    )


def flux2_call(config, batch, height, width, frames, dtype):
    tokens = (height // 16) * (width // 16)
    return (), dict(
        **flux_latents(config, batch, tokens, dtype),
        encoder_hidden_states=meta(batch, TEXT_TOKENS, config.joint_attention_dim, dtype=dtype),
        txt_ids=meta(batch, TEXT_TOKENS, 4, dtype=I64), img_ids=meta(batch, tokens, 4, dtype=I64),
        joint_attention_kwargs=None, return_dict=False,
    )


def wan_call(config, batch, height, width, frames, dtype):
    items = 2 * batch  # stagediff runs cond and uncond as one batch
    latent_frames = (frames - 1) // 4 + 1
    return (), dict(
        hidden_states=meta(items, config.in_channels, latent_frames, height // 8, width // 8, dtype=dtype),
        timestep=meta(items, dtype=I64), encoder_hidden_states=meta(items, TEXT_TOKENS, config.text_dim, dtype=dtype),
        attention_kwargs=None, return_dict=False,
    )


@dataclass(frozen=True)
class Family:
    tiny: str
    call: Callable
    denoiser: Callable[[], torch.nn.Module]
    """The real-size denoiser (built on the meta device)."""
    vae: Callable[[], torch.nn.Module]
    height: int
    width: int
    frames: int | None = None
    mesh: str | None = None
    """The denoiser's mesh on a TPU host (the README's layouts), None for one chip."""


FAMILIES = {
    "sdxl": Family("sdxl", sdxl_call, lambda: sdxl.denoiser("full"), lambda: sdxl.autoencoder("full"), 1024, 1024),
    "flux1": Family("flux1", flux1_call, lambda: flux1.denoiser("full"), lambda: flux1.autoencoder("full"), 1024, 1024),
    "flux2": Family("flux2", flux2_call, lambda: flux2.denoiser("full"), lambda: flux2.autoencoder("full"), 1024, 1024,
                    mesh="tp=8"),
    "flux2-klein": Family("flux2-klein", flux2_call, lambda: flux2.denoiser("full", guidance_embeds=False),
                          lambda: flux2.autoencoder("full"), 1024, 1024),
    "wan": Family("wan", wan_call, lambda: wan.denoiser("full", **wan.WAN_14B), lambda: wan.autoencoder("full"), 480, 832,
                  81, mesh="dp=2,tp=4"),
}
"""Real sizes: SDXL and FLUX at 1024², Wan 2.1 14B at 480p with 81 frames; FLUX.2-dev (32B) over 8 chips
with tensor parallelism, Wan's cond/uncond pair over `dp` and its weights over `tp`."""


def on_meta(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with torch.device("meta"):
        return build().to(BF16).eval()


def kernel_calls(exported) -> int:
    return exported.mlir_module().count("tpu_custom_call")


@pytest.mark.parametrize("family", FAMILIES)
def test_the_denoiser_step_lowers_for_tpu_with_the_flash_kernel(eight_devices, family):
    case = FAMILIES[family]
    denoiser = on_meta(case.denoiser)
    args, kwargs = case.call(denoiser.config, 1, case.height, case.width, case.frames, BF16)
    mesh = make_mesh(case.mesh) if case.mesh else None
    call = export_call(denoiser, *args, mesh=mesh, rules=RULES[family],
                       attention=FAMILY_ATTENTION.get(family, AttentionConfig()), **kwargs)
    assert call.exported.platforms == ("tpu",)
    assert call.exported.nr_devices == (mesh.size if mesh else 1)
    assert kernel_calls(call.exported) > 0  # attention runs the Pallas kernel, lowered to Mosaic
    (prediction,) = call.outputs
    expected = args[0] if args else kwargs["hidden_states"]
    assert prediction.shape == expected.shape


@pytest.mark.parametrize("family, mesh", [("sdxl", None), ("flux1", "tp=8"), ("flux2", None)])
def test_the_image_vae_decode_lowers_for_tpu(eight_devices, family, mesh):
    """The decoder network at 1024² (FLUX.2-klein shares FLUX.2's VAE); on 8 chips, the image's rows
    split over them."""
    case = FAMILIES[family]
    vae = on_meta(case.vae)
    device_mesh = make_mesh(mesh) if mesh else None
    call = export_call(vae.decoder, meta(1, vae.config.latent_channels, case.height // 8, case.width // 8),
                       mesh=device_mesh, input_layout=image_input_spec)
    assert call.outputs.shape == (1, 3, case.height, case.width)
    assert call.exported.nr_devices == (8 if mesh else 1)
    assert kernel_calls(call.exported) == 1  # the mid-block attention over all 16384 latent pixels


def test_every_wan_vae_program_lowers_for_tpu(eight_devices):
    """The causal decoder's three programs at 480p on 8 chips (the frame's columns split over them): the
    first latent frame (empty cache), the second (one cached frame) and every later one (two), each
    feeding the next its cache."""
    case = FAMILIES["wan"]
    vae = on_meta(case.vae)
    assert DECODER_STAND_INS[type(vae).__name__].__name__ == "CompiledCausalDecoder"
    vae.clear_cache()
    cache, step, mesh = vae._feat_map, CausalStep(vae.decoder), make_mesh("tp=8")
    frame = meta(1, vae.config.z_dim, 1, case.height // 8, case.width // 8)
    signatures = []
    for index in range(4):
        inputs = Flattened.of(((frame, cache, 0), {"first_chunk": index == 0}))
        call = export_call(step, frame, cache, 0, first_chunk=index == 0, mesh=mesh, input_layout=image_input_spec)
        frames, cache, _ = call.outputs
        signatures.append(inputs.signature)
        assert frames.shape == (1, 3, 1 if index == 0 else 4, case.height, case.width)
        assert call.exported.nr_devices == 8
    assert len(set(signatures)) == 3  # the fourth frame reuses the third's program


def recorded_denoiser_call(model, family, size) -> tuple:
    """The layout and shapes of the first call stagediff's denoise makes to the model's denoiser."""
    request = Request(model=str(model), prompts=["a cat"], seeds=[0], steps=1, backend="torch", **size,
                      store=str(model.parent / f"recorded-{family}"))
    plan = make_plan(request)
    stages.encode(plan)
    calls = []
    denoiser = getattr(stages.stage_pipeline(plan, stages.DENOISE), plan.family.denoiser_component)
    hook = denoiser.register_forward_pre_hook(lambda module, args, kwargs: calls.append(Flattened.of((args, kwargs))),
                                              with_kwargs=True)
    try:
        stages.denoise(plan)
    finally:
        hook.remove()
        stages.release()
    return calls[0], denoiser.config


@pytest.mark.parametrize("family", FAMILIES)
def test_the_exported_arguments_are_what_the_denoise_stage_passes(tiny_models, family):
    case = FAMILIES[family]
    size = dict(height=32, width=48, **({"frames": 5} if case.frames else {}))
    recorded, config = recorded_denoiser_call(tiny_models(case.tiny), family, size)
    written = Flattened.of(case.call(config, 1, size["height"], size["width"], size.get("frames"), F32))
    assert written.program_key == recorded.program_key
    assert [tuple(t.shape) for t in written.tensors] == [tuple(t.shape) for t in recorded.tensors]
