"""Benchmark workloads, each run in its own process so timings and peak memory are its own.

    python benchmarks/workloads.py WORKLOAD '{"json": "arguments"}'

prints one JSON line with the measurements (and `max_rss_mb`, the process's peak resident memory).
An argument `threads` sets torch's thread count first.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _request(args: dict, **overrides):
    from stagediff.request import Request

    options = {
        "model": args["model"], "prompts": args["prompts"], "seeds": args["seeds"], "steps": args["steps"],
        "height": args["height"], "width": args["width"], "store": args["store"], "batch_size": args.get("batch_size", 1),
        "backend": args.get("backend", "torch"), "dtype": args.get("dtype", "float32"),
    }
    if args.get("frames"):
        options["frames"] = args["frames"]
    return Request(**{**options, **overrides})


def import_pipeline_class(model: str):
    """Import the model's pipeline class (seconds of library imports) before any clock starts, in
    every workload alike, so that timings compare the work and not Python's imports."""
    import diffusers

    class_name = json.loads((Path(model) / "model_index.json").read_text())["_class_name"]
    return getattr(diffusers, class_name)


class StepClock:
    """A diffusers `callback_on_step_end` that records when each denoising step ends."""

    def __init__(self, device):
        self.device = device
        self.times: list[float] = []

    def __call__(self, pipe, step, timestep, callback_kwargs):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return callback_kwargs


def plain_loop(args: dict) -> dict:
    """Load the diffusers pipeline once, call it per (prompt, seed), save each output as stagediff would."""
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    from stagediff.backends import torch_device
    from stagediff.media import media_bytes
    from stagediff.stages import TORCH_DTYPES

    import_pipeline_class(args["model"])
    start = time.perf_counter()
    device = torch_device()
    pipe = DiffusionPipeline.from_pretrained(args["model"], torch_dtype=TORCH_DTYPES[args.get("dtype", "float32")])
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    encode_calls = count_calls(pipe, "encode_prompt")
    load = time.perf_counter() - start
    out = Path(args["out"])
    out.mkdir(parents=True, exist_ok=True)
    extra = {"num_frames": args["frames"]} if args.get("frames") else {}
    item_seconds, step_seconds = [], []
    for p_index, prompt in enumerate(args["prompts"]):
        for seed in args["seeds"]:
            item_start = time.perf_counter()
            clock = StepClock(device)
            result = pipe(prompt=prompt, num_inference_steps=args["steps"], height=args["height"], width=args["width"],
                          generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                          callback_on_step_end=clock, **extra)
            pixels = getattr(result, "images", None)
            pixels = result.frames[0] if pixels is None else pixels
            frames = (np.asarray(pixels) * 255).round().astype(np.uint8)
            extension = "mp4" if args.get("frames") else "png"
            (out / f"{p_index}-{seed}.{extension}").write_bytes(media_bytes(extension, [frames], 16, {"seed": seed}))
            item_seconds.append(time.perf_counter() - item_start)
            step_seconds.append(float(np.median(np.diff(clock.times))) if len(clock.times) > 1 else None)
    return {"seconds": time.perf_counter() - start, "load_seconds": load, "item_seconds": item_seconds,
            "step_seconds": step_seconds, "encode_calls": len(encode_calls)}


def count_calls(target, method: str) -> list:
    """Record each call of `target.method` (an entry per call) in the returned list."""
    calls = []
    original = getattr(target, method)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(target, method, counted)
    return calls


def staged(args: dict) -> dict:
    """stagediff's three stages through the library, in one process (models stay loaded per stage)."""
    from stagediff import stages
    from stagediff.plan import make_plan

    import_pipeline_class(args["model"])
    start = time.perf_counter()
    plan = make_plan(_request(args))
    results = {}
    for stage in (stages.encode, stages.denoise, stages.decode):
        stage_start = time.perf_counter()
        result = stage(plan)
        stages.release(result.stage)
        results[result.stage] = {
            "seconds": time.perf_counter() - stage_start, "load_seconds": result.load_seconds,
            "compute_seconds": sum(result.item_seconds), "item_seconds": result.item_seconds,
            "computed": result.computed,
        }
    return {"seconds": time.perf_counter() - start, "stages": results,
            "media": [plan.store.uri_of(item.media_path) for item in plan.items]}


def cached_denoise(args: dict) -> dict:
    """Encode the items once, then denoise and decode them under each `--cache` setting in turn (the exact
    run, `none`, among them), in one process with the models loaded once: per setting the denoise seconds
    (wall clock, and this process's CPU time), the work done in the transformer blocks and the media. A
    first denoise of another seed warms up; MagCache is calibrated first (on that seed) for a model
    diffusers ships no ratios for."""
    from stagediff import stages
    from stagediff.cache_calibration import calibrate_magcache
    from stagediff.plan import make_plan

    import_pipeline_class(args["model"])
    plan = make_plan(_request(args))
    other_seed = _request(args, seeds=[args["other_seed"]])
    if any(spec.startswith("magcache") for spec in args["caches"]) and not plan.family.ships_magcache_ratios:
        calibrate_magcache(make_plan(other_seed))
    else:
        stages.encode(make_plan(other_seed))
        stages.denoise(make_plan(other_seed))
    stages.encode(plan)
    block_work = count_block_work(stages.stage_pipeline(plan, stages.DENOISE).transformer)
    measured = {}
    for spec in args["caches"]:
        plan = make_plan(_request(args, cache=spec))
        block_work[0] = 0
        cpu_start = time.process_time()
        denoised = stages.denoise(plan)
        measured[spec] = {"denoise_seconds": sum(denoised.item_seconds), "block_work": block_work[0],
                          "denoise_cpu_seconds": time.process_time() - cpu_start}
        stages.decode(plan)
        measured[spec]["media"] = [plan.store.uri_of(item.media_path) for item in plan.items]
    return measured


def count_block_work(transformer) -> list[int]:
    """A one-element list that counts the multiply-accumulates of the Linear layers inside the transformer's
    blocks as they run: a block a cache skips, or whose attention it predicts, adds nothing. Unlike time,
    other processes on the machine cannot disturb it."""
    import torch

    work = [0]

    def count(linear, inputs, output):
        work[0] += linear.weight.numel() * (inputs[0].numel() // inputs[0].shape[-1])

    for blocks in transformer.children():
        if isinstance(blocks, torch.nn.ModuleList):
            for module in blocks.modules():
                if isinstance(module, torch.nn.Linear):
                    module.register_forward_hook(count)
    return work


def stage(args: dict) -> dict:
    """One stage alone (as `stagediff encode|denoise|decode` runs it): its time and peak memory."""
    from stagediff import stages
    from stagediff.plan import make_plan

    start = time.perf_counter()
    result = getattr(stages, args["stage"])(make_plan(_request(args)))
    return {"seconds": time.perf_counter() - start, "computed": result.computed}


def full_pipeline(args: dict) -> dict:
    """The whole diffusers pipeline in one process, one item: the memory baseline."""
    return plain_loop({**args, "prompts": args["prompts"][:1], "seeds": args["seeds"][:1]})


def compile_times(args: dict) -> dict:
    """torchax denoise: first call (compile, or load from the persistent cache) and a warm second call."""
    from stagediff import stages
    from stagediff.plan import make_plan
    from tpu_ops import compile_cache

    plan = make_plan(_request(args, backend="torchax", seeds=[args["seeds"][0]]))
    stages.encode(plan)
    first = stages.denoise(plan)
    warm_plan = make_plan(_request(args, backend="torchax", seeds=[args["seeds"][0] + 1000]))
    second = stages.denoise(warm_plan)
    return {"first_compile_seconds": first.compile_seconds, "first_item_seconds": first.item_seconds[0],
            "warm_item_seconds": second.item_seconds[0], "warm_compiles": second.compiles,
            "cache_hits": compile_cache.stats.hits}


def decode_only(args: dict) -> dict:
    """The decode stage alone on stored latents (as `stagediff decode` runs it): per-item seconds and,
    with torchax, its compilations."""
    from stagediff import stages
    from stagediff.plan import make_plan

    import_pipeline_class(args["model"])
    plan = make_plan(_request(args))
    result = stages.decode(plan)
    return {"load_seconds": result.load_seconds, "item_seconds": result.item_seconds, "compiles": result.compiles,
            "compile_seconds": result.compile_seconds, "cache_hits": result.compile_cache_hits,
            "media": [plan.store.uri_of(item.media_path) for item in plan.items]}


def wan_vae_programs(args: dict) -> dict:
    """The real Wan 2.1 VAE (random weights) decoding `latent_frames` frames two times: in torch, with
    the per-frame compiled decoder stagediff uses (`frame`), or with its whole decode compiled as one
    program (`whole`). Compile seconds count tracing and XLA compilation."""
    import torch

    from stagediff.decoding import CompiledCausalDecoder
    from stagediff.tiny import wan
    from tpu_ops.compiled_module import CompiledModule

    class WholeDecode(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, latents):
            return self.vae.decode(latents, return_dict=False)[0]

    torch.manual_seed(0)
    vae = wan.autoencoder("full").eval()
    side = args["size"] // 8
    latents = [torch.randn(1, vae.config.z_dim, args["latent_frames"], side, side) for _ in range(2)]
    compiles: list[float] = []
    decode = lambda z: vae.decode(z, return_dict=False)[0]  # noqa: E731
    if args["mode"] == "frame":
        object.__setattr__(vae, "decoder", CompiledCausalDecoder(vae.decoder, on_compile=compiles.append))
    elif args["mode"] == "whole":
        decode = CompiledModule(WholeDecode(vae), on_compile=compiles.append)
    seconds = []
    with torch.no_grad():
        for z in latents:
            start = time.perf_counter()
            frames = decode(z)
            seconds.append(time.perf_counter() - start)
    return {"first_seconds": seconds[0], "warm_seconds": seconds[1], "programs": len(compiles),
            "compile_seconds": sum(compiles), "frames": frames.shape[2]}


def vae_memory(args: dict) -> dict:
    """The real SDXL VAE (random weights) decoding one `size`² image in torch, in one piece or in tiles
    of `tile` pixels, and stagediff's estimate of the one-piece decode's activations."""
    import torch

    from stagediff.decoding import decode_bytes, set_tiling
    from stagediff.tiny import sdxl

    torch.manual_seed(0)
    vae = sdxl.autoencoder("full").eval()
    latents = torch.randn(1, vae.config.latent_channels, args["size"] // 8, args["size"] // 8)
    set_tiling(vae, args.get("tile"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    with torch.no_grad():
        vae.decode(latents)
    return {"seconds": time.perf_counter() - start, "rss_before_decode_mb": before,
            "estimate_mb": decode_bytes(vae, tuple(latents.shape), torch.float32) / 2**20}


def flow_in_process(args: dict) -> dict:
    """The `generate` flow in-process on an ephemeral Prefect API (server start timed apart)."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.generate import generate

    start = time.perf_counter()
    with prefect_test_harness():
        ready = time.perf_counter()
        generate(model=args["model"], prompts=args["prompts"], seeds=args["seeds"], steps=args["steps"],
                 height=args["height"], width=args["width"], store=args["store"], dispatch="in-process",
                 batch_size=args.get("batch_size", 1))
        done = time.perf_counter()
    return {"server_start_seconds": ready - start, "seconds": done - ready}


WORKLOADS = {f.__name__: f for f in (plain_loop, staged, cached_denoise, stage, full_pipeline, compile_times,
                                     decode_only, wan_vae_programs, vae_memory, flow_in_process)}

if __name__ == "__main__":
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    arguments = json.loads(sys.argv[2])
    if "threads" in arguments:
        import torch

        torch.set_num_threads(arguments["threads"])
    measured = WORKLOADS[sys.argv[1]](arguments)
    measured["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(measured))
