"""The `stagediff` command: generate, the three stages one at a time, cache calibration, and tiny models."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from stagediff.confinement import check_location, check_run_name
from stagediff.errors import StagediffError
from stagediff.options import GENERATION_OPTIONS, RUN_OPTIONS, request_from_options

STAGE_COMMANDS = ("encode", "denoise", "decode", "score")
LEFTOVER_AGE_SECONDS = 3600
"""`stagediff.store.LEFTOVER_AGE_SECONDS`, repeated so that `--help` imports no torch (a test keeps them equal)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the bad value, exit code 2."""

    def error(self, message):
        self.exit(2, f"stagediff: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="stagediff", description="Staged, resumable diffusion generation.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    generate = commands.add_parser("generate", help="run encode → denoise → decode for every prompt × seed")
    _add_generation_options(generate)
    for stage in STAGE_COMMANDS:
        _add_generation_options(commands.add_parser(stage, help=f"run only the {stage} stage"))

    calibrate = commands.add_parser("calibrate-cache", help="compute MagCache's magnitude ratios for a model "
                                    "(stored in the store, found there by --cache magcache)")
    _add_generation_options(calibrate)
    status = commands.add_parser("status", help="per stage, what the store holds of a batch (its options) or "
                                 "of a run (--run); reads listings and headers, loads no model")
    _add_generation_options(status, required=False)
    status.add_argument("--run", help="report this run's manifest (in --store) instead of a batch")
    verify = commands.add_parser("verify", help="read every artifact of a store in full; report the corrupt ones")
    verify.add_argument("store", help="local folder or gs://bucket/prefix")
    verify.add_argument("--repair", action="store_true", help="remove corrupt artifacts (the next run recomputes them)")
    gc = commands.add_parser("gc", help="list what killed writers left (and unreferenced artifacts); delete with --delete")
    gc.add_argument("store", help="local folder or gs://bucket/prefix")
    gc.add_argument("--unreferenced", action="store_true", help="also artifacts that no run declares (no manifest, "
                    "no run record of a live or recently died run)")
    gc.add_argument("--delete", action="store_true", help="delete them (without it, only list them)")
    gc.add_argument("--older-than", type=float, default=LEFTOVER_AGE_SECONDS, metavar="SECONDS",
                    help="only files at least this old (default 3600)")

    sheet = commands.add_parser("contact-sheet", help="one PNG of one or several runs side by side: rows are prompts, "
                                "columns seeds and swept values")
    sheet.add_argument("manifests", nargs="+", metavar="MANIFEST", help="a run's manifest.json (local or gs://)")
    sheet.add_argument("--output", default="contact-sheet.png", help="the PNG to write (default ./contact-sheet.png)")

    doctor = commands.add_parser("doctor", help="versions, devices per backend, caches, the Prefect API and its "
                                 "stage workers, a store; exit 1 when something a stage needs is missing")
    doctor.add_argument("--stage", action="append", metavar="STAGE",
                        help="encode, denoise or decode (repeat or comma-separate; default all): check what they need")
    doctor.add_argument("--store", help="check that this store (local folder or gs://bucket/prefix) is writable")
    doctor.add_argument("--backend", default="auto", help="auto, torch or torchax (default auto)")
    doctor.add_argument("--mesh", help="a torchax mesh to check against this machine's devices, e.g. tp=8")
    compare = commands.add_parser("compare", help="per-setting and per-prompt score differences of two runs, and a "
                                  "chart of score against the swept value")
    compare.add_argument("manifests", nargs=2, metavar="RUN", help="a run's manifest.json (local or gs://)")
    compare.add_argument("--output", default="compare.png", help="the chart to write (default ./compare.png)")
    compare.add_argument("--scorer", help="which scorer to compare (default: the first both runs have)")

    tiny = commands.add_parser("tiny-model", help="build a tiny random-init model of a family")
    tiny.add_argument("family", help="sdxl, flux1, flux1-schnell, flux2, flux2-klein, flux2-klein-base, wan, or clip "
                      "(a scorer for --score clip:FOLDER)")
    tiny.add_argument("folder", help="where to write the checkpoint (diffusers layout)")
    tiny.add_argument("--scale", default="tiny", help="tiny (tests, demo), small (CPU benchmarks: ~50-100M "
                      "parameter denoisers) or full (the real architectures: sdxl, flux1, flux1-schnell, wan)")
    return parser


def _add_generation_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    for option in GENERATION_OPTIONS + RUN_OPTIONS:
        if option.value_type is bool:  # a switch: given means true
            parser.add_argument(*option.flags, dest=option.name, action="store_true", help=option.help,
                                default=option.default_value)
            continue
        parser.add_argument(
            *option.flags, dest=option.name, type=option.value_type, help=option.help,
            choices=option.choices or None, required=required and option.required,
            action="append" if option.repeated or option.grid else "store",
            **({} if option.required else {"default": None if option.repeated else option.default_value}),
        )


def _quiet_libraries() -> None:
    """Keep the terminal for our own output: no torchvision fallback notes or download bars. Set
    through the environment, which the libraries read when (and only if) a command imports them."""
    for variable, value in (("TOKENIZERS_PARALLELISM", "false"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                            ("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error"),
                            ("PREFECT_SERVER_ANALYTICS_ENABLED", "false")):
        os.environ.setdefault(variable, value)
    warnings.filterwarnings("ignore")


def run(args, generate=None) -> int:
    """Run one command; `generate(args) -> manifest URI` replaces the in-process batch (the
    Prefect-recorded run of `flows.cli`)."""
    if args.command == "generate":
        return _generate(args, generate)
    return COMMANDS[args.command](args)


def _doctor(args) -> int:
    from stagediff.doctor import doctor

    return doctor(args)


def _tiny_model(args) -> int:
    from stagediff.tiny import build_tiny_model

    print(build_tiny_model(args.family, args.folder, args.scale))
    return 0


def _plan(args):
    """The validated plan of the command's batch; nothing is written yet."""
    from stagediff.plan import make_plan

    request = request_from_options(vars(args))
    check_run_name(args.run_name)
    if args.manifest:
        check_location("--manifest", args.manifest)
    return make_plan(request)


def _generate(args, generate=None) -> int:
    from stagediff.manifest import default_run_name

    plan = _plan(args)
    plan.store.check_writable()
    _say_where_stages_run(plan, ("encode", "denoise", "decode"))
    if generate is not None:
        manifest_uri = generate(args)
    else:
        from stagediff.progress import TqdmProgress
        from stagediff.scheduler import BatchRun
        from stagediff.stages import local_executor

        run_name = args.run_name or default_run_name(plan.request.model)
        progress = TqdmProgress()
        try:
            manifest_uri = BatchRun(plan, local_executor(plan, progress), run_name, args.manifest).run()
        finally:
            progress.close()
    print(f"manifest: {manifest_uri}")
    for item in plan.items:
        print(plan.store.uri_of(item.media_path))
    return 0


def _stage(args) -> int:
    from stagediff.manifest import default_run_name
    from stagediff.progress import TqdmProgress
    from stagediff.run_records import declared_run, plan_paths
    from stagediff.stages import run_stage

    plan = _plan(args)
    plan.store.check_writable()
    _say_where_stages_run(plan, (args.command,))
    progress = TqdmProgress()
    # Declared like a batch (a run record, no manifest): `gc` keeps its work for the next stage.
    run_name = args.run_name or f"{args.command}-{default_run_name(plan.request.model)}"
    try:
        with declared_run(plan.store, run_name, plan_paths(plan)):
            uris = run_stage(args.command, plan, progress=progress).uris
    finally:
        progress.close()
    for uri in uris:
        print(uri)
    return 0


def _say_where_stages_run(plan, stages) -> None:
    """Log (stderr) each stage's backend, devices and mesh here; a missing backend fails now."""
    from stagediff.devices import check_stages_here

    check_stages_here(stages, plan.request.backend, plan.request.mesh,
                      say=lambda line: print(f"stagediff: {line}", file=sys.stderr))


def _calibrate_cache(args) -> int:
    from stagediff.cache_calibration import calibrate_magcache

    if args.cache != "none":
        raise StagediffError(f"calibrate-cache calibrates magcache and takes no --cache (got {args.cache})")
    plan = _plan(args)
    plan.store.check_writable()
    uri, ratios = calibrate_magcache(plan)
    print("magcache ratios: " + ", ".join(f"{ratio:.5f}" for ratio in ratios))
    print(uri)
    return 0


def _status(args) -> int:
    if args.run:
        return _status_of_run(args)
    from stagediff.inventory import plan_state

    plan = _plan(args)
    return _print_state(plan.store, plan_state(plan))


def _status_of_run(args) -> int:
    import json

    from stagediff.inventory import manifest_state
    from stagediff.store import Store

    check_run_name(args.run)
    check_location("--store", args.store)
    store = Store(args.store)
    try:
        manifest = json.loads(store.read_bytes(f"runs/{args.run}/manifest.json"))
    except FileNotFoundError:
        raise StagediffError(f"--run {args.run}: no manifest in {args.store}") from None
    return _print_state(store, manifest_state(store, manifest))


def _print_state(store, state) -> int:
    from stagediff.inventory import DONE

    for stage, counts in state.counts().items():
        print(f"{stage:8s} " + ", ".join(f"{count} {name}" for name, count in sorted(counts.items())))
    for paths in (state.embeddings, state.latents, state.media):
        for path, found in paths.items():
            if found != DONE:
                print(f"{found:8s} {store.uri_of(path)}")
    return 0


def _verify(args) -> int:
    from tqdm import tqdm

    from stagediff.housekeeping import verify
    from stagediff.store import Store

    check_location("--store", args.store)
    store = Store(args.store)
    with tqdm(desc="verify", unit="artifact", file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
        report = verify(store, repair=args.repair, on_checked=lambda path: bar.update(1))
    for path in report.corrupt:
        print(f"corrupt    {store.uri_of(path)}" + ("  (removed)" if path in report.removed else ""))
    for problem in report.unreadable:
        print(f"unreadable {problem}")
    print(f"{report.checked} artifacts checked, {len(report.corrupt)} corrupt, {len(report.unreadable)} unreadable")
    return 0


def _gc(args) -> int:
    from stagediff.housekeeping import collect, garbage
    from stagediff.store import Store

    check_location("--store", args.store)
    store = Store(args.store)
    report = garbage(store, unreferenced=args.unreferenced, older_than=args.older_than)
    if args.delete:
        collect(store, report, older_than=args.older_than)
    for path in report.leftovers:
        print(f"leftover     {path}")
    for path in report.unreferenced:
        print(f"unreferenced {store.uri_of(path)}")
    for path in report.kept:
        print(f"kept         {store.uri_of(path)}  (declared or written again since it was listed)")
    found = len(report.leftovers) + len(report.unreferenced)
    print(f"{found} files {'deleted' if report.deleted else 'found (run again with --delete to delete them)'}")
    return 0


def _contact_sheet(args) -> int:
    from stagediff.contact_sheet import contact_sheet_png
    from stagediff.gcs import read_location
    from stagediff.manifest import read_run_manifest

    check_location("--output", args.output)
    runs = [read_run_manifest(location) for location in args.manifests]
    data = contact_sheet_png(runs, read_location)
    with open(args.output, "wb") as file:
        file.write(data)
    print(args.output)
    return 0


def _compare(args) -> int:
    from stagediff.compare import compare_runs
    from stagediff.manifest import read_run_manifest

    check_location("--output", args.output)
    first, second = (read_run_manifest(location, "RUN") for location in args.manifests)
    report = compare_runs(first, second, args.scorer)
    print(report.text())
    with open(args.output, "wb") as file:
        file.write(report.chart_png())
    print(args.output)
    return 0



COMMANDS = {"encode": _stage, "denoise": _stage, "decode": _stage, "score": _stage, "calibrate-cache": _calibrate_cache,
            "status": _status, "verify": _verify, "gc": _gc, "contact-sheet": _contact_sheet, "compare": _compare,
            "tiny-model": _tiny_model, "doctor": _doctor}


def generate_parameters(args) -> dict:
    """The `generate` flow's parameters from the command line (same names, snake_case)."""
    values = {option.name: getattr(args, option.name) for option in GENERATION_OPTIONS + RUN_OPTIONS}
    # Options not given take the flow's defaults; lists, not tuples, as JSON has them.
    return {name: list(value) if isinstance(value, tuple) else value for name, value in values.items()
            if value is not None}


def main(argv: list[str] | None = None, generate=None) -> int:
    """The command line; `generate` as in `run`."""
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return run(args, generate)
    except StagediffError as error:
        print(f"stagediff: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stagediff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
