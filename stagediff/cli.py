"""The `stagediff` command: generate, the three stages one at a time, and tiny models."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from stagediff.errors import StagediffError
from stagediff.request import DEFAULT_STORE, DTYPES, Request

STAGE_COMMANDS = ("encode", "denoise", "decode")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the bad value, exit code 2."""

    def error(self, message):
        self.exit(2, f"stagediff: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="stagediff", description="Staged, resumable diffusion generation.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    generate = commands.add_parser("generate", help="run encode → denoise → decode as a Prefect flow")
    _add_generation_options(generate)
    for stage in STAGE_COMMANDS:
        _add_generation_options(commands.add_parser(stage, help=f"run only the {stage} stage"))

    tiny = commands.add_parser("tiny-model", help="build a tiny random-init model of a family")
    tiny.add_argument("family", help="sdxl, flux1, flux1-schnell, flux2, flux2-klein, flux2-klein-base or wan")
    tiny.add_argument("folder", help="where to write the checkpoint (diffusers layout)")
    tiny.add_argument("--scale", default="tiny", help="tiny (tests, demo), small (CPU benchmarks: ~50-100M "
                      "parameter denoisers) or full (the real architectures: sdxl, flux1, flux1-schnell, wan)")
    return parser


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face id or local diffusers folder")
    parser.add_argument("--prompt", action="append", required=True, dest="prompts", help="repeat for several")
    parser.add_argument("--seed", action="append", type=int, required=True, dest="seeds", help="repeat for several")
    parser.add_argument("--negative-prompt", help="default: the pipeline's own")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the family's)")
    parser.add_argument("--guidance", type=float, help="guidance scale: CFG or embedded, as the family uses it")
    parser.add_argument("--height", type=int, help="pixels, a multiple of the VAE factor")
    parser.add_argument("--width", type=int, help="pixels, a multiple of the VAE factor")
    parser.add_argument("--frames", type=int, help="video frames (video families)")
    parser.add_argument("--fps", type=int, help="video frames per second (video families)")
    parser.add_argument("--flow-shift", type=float, help="flow-matching shift (Wan: 3.0 for 480p, 5.0 for 720p)")
    parser.add_argument("--true-cfg", type=float, help="FLUX.1: true CFG scale, used with --negative-prompt (default 1: off)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--store", default=DEFAULT_STORE, help="local folder or gs://bucket/prefix")
    parser.add_argument("--backend", default="auto", help="auto, torch or torchax (auto: torchax on TPU)")
    parser.add_argument("--batch-size", type=int, default=1, help="items denoised per compiled call")
    parser.add_argument("--mesh", help="torchax device mesh, e.g. tp=8 or dp=2,tp=4 (axes dp, fsdp, tp)")
    parser.add_argument("--manifest", help="also write the run manifest here")
    parser.add_argument("--run-name", help="name of the run folder under runs/ in the store")


def request_from(args) -> Request:
    return Request(
        model=args.model,
        prompts=args.prompts,
        seeds=args.seeds,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        guidance=args.guidance,
        height=args.height,
        width=args.width,
        frames=args.frames,
        fps=args.fps,
        dtype=args.dtype,
        store=args.store,
        backend=args.backend,
        batch_size=args.batch_size,
        mesh=args.mesh,
        extras={"flow_shift": args.flow_shift, "true_cfg": args.true_cfg},
    )


def _quiet_libraries() -> None:
    """Keep the terminal for our own output: no torchvision fallback notes or download bars."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import transformers
    import diffusers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def run(args) -> int:
    if args.command == "tiny-model":
        from stagediff.tiny import build_tiny_model

        print(build_tiny_model(args.family, args.folder, args.scale))
        return 0

    request = request_from(args)
    from stagediff.plan import make_plan

    plan = make_plan(request)
    plan.store.check_writable()
    if args.command == "generate":
        from flows.generate import generate

        manifest_uri = generate(**generate_parameters(args), dispatch="in-process")
        print(f"manifest: {manifest_uri}")
        for uri in [plan.store.uri_of(item.media_path) for item in plan.items]:
            print(uri)
        return 0

    from stagediff import stages
    from stagediff.progress import TqdmProgress

    result = getattr(stages, args.command)(plan, progress=TqdmProgress())
    for uri in result.uris:
        print(uri)
    return 0


def generate_parameters(args) -> dict:
    """The `generate` flow's parameters from the command line (same names, snake_case)."""
    names = (
        "model", "prompts", "seeds", "negative_prompt", "steps", "guidance", "height", "width", "frames", "fps",
        "flow_shift", "true_cfg", "dtype", "store", "backend", "batch_size", "mesh", "run_name", "manifest",
    )
    return {name: getattr(args, name) for name in names}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return run(args)
    except StagediffError as error:
        print(f"stagediff: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stagediff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
