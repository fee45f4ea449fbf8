"""The `stagediff` command: generate, the three stages one at a time, cache calibration, and tiny models."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from stagediff.errors import StagediffError
from stagediff.options import GENERATION_OPTIONS, RUN_OPTIONS, request_from_options

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

    calibrate = commands.add_parser("calibrate-cache", help="compute MagCache's magnitude ratios for a model "
                                    "(stored in the store, found there by --cache magcache)")
    _add_generation_options(calibrate)

    tiny = commands.add_parser("tiny-model", help="build a tiny random-init model of a family")
    tiny.add_argument("family", help="sdxl, flux1, flux1-schnell, flux2, flux2-klein, flux2-klein-base or wan")
    tiny.add_argument("folder", help="where to write the checkpoint (diffusers layout)")
    tiny.add_argument("--scale", default="tiny", help="tiny (tests, demo), small (CPU benchmarks: ~50-100M "
                      "parameter denoisers) or full (the real architectures: sdxl, flux1, flux1-schnell, wan)")
    return parser


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    for option in GENERATION_OPTIONS + RUN_OPTIONS:
        parser.add_argument(
            option.flag, dest=option.name, type=option.value_type, help=option.help,
            choices=option.choices or None, required=option.required,
            action="append" if option.repeated else "store",
            **({} if option.required else {"default": option.default_value}),
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

    request = request_from_options(vars(args))
    if args.command == "calibrate-cache" and request.cache != "none":
        raise StagediffError(f"calibrate-cache calibrates magcache and takes no --cache (got {request.cache})")
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

    if args.command == "calibrate-cache":
        from stagediff.cache_calibration import calibrate_magcache

        uri, ratios = calibrate_magcache(plan)
        print("magcache ratios: " + ", ".join(f"{ratio:.5f}" for ratio in ratios))
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
    return {option.name: getattr(args, option.name) for option in GENERATION_OPTIONS + RUN_OPTIONS}


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
