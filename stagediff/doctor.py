"""`stagediff doctor`: what this machine has for the stages, like `diffusers-cli env` or `prefect
version`. Versions, devices per backend and where each stage would compute, the model, compile and
digest caches, the Prefect API and the stage workers connected to it, and whether a store is
writable. It exits 1, naming each on stderr, when something that a given stage (`--stage`, default
all three) or the given store needs is missing here.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from stagediff.errors import StagediffError, one_line

STAGES = ("encode", "denoise", "decode")
LIBRARIES = ("torch", "jax", "jaxlib", "libtpu", "torchax", "diffusers", "transformers", "prefect",
             "prefect-kubernetes", "gcsfs")
STAGE_LIBRARIES = {"encode": ("torch", "diffusers", "transformers"),
                   "denoise": ("torch", "diffusers"), "decode": ("torch", "diffusers")}


@dataclass
class Report:
    """The lines printed, by section, and the problems that make the exit code 1."""

    sections: list[tuple[str, list[str]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def section(self, title: str) -> list[str]:
        lines: list[str] = []
        self.sections.append((title, lines))
        return lines

    def text(self) -> str:
        return "\n".join(f"{title}\n" + "".join(f"  {line}\n" for line in lines) for title, lines in self.sections)


def parse_stages(values: list[str] | None) -> tuple[str, ...]:
    """`--stage` values (repeated or comma-separated) in stage order; all three when none is given."""
    if not values:
        return STAGES
    named = {name.strip() for value in values for name in value.split(",") if name.strip()}
    unknown = sorted(named - set(STAGES))
    if unknown or not named:
        raise StagediffError(f"--stage {','.join(unknown) or ''!s}: stages are {', '.join(STAGES)}")
    return tuple(stage for stage in STAGES if stage in named)


def version_of(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def diagnose(stages=STAGES, backend: str = "auto", mesh: str | None = None, store: str | None = None) -> Report:
    """The whole report for this machine (imports torch, jax and torchax to ask them for devices)."""
    report = Report()
    versions = _versions(report)
    _devices(report, stages, backend, mesh)
    _caches(report, stages, backend)
    _prefect(report)
    if store is not None:
        _store(report, store)
    for stage in stages:
        for library in STAGE_LIBRARIES[stage]:
            if versions.get(library) is None:
                report.problems.append(f"{library} is not installed (the {stage} stage needs it)")
    report.problems = list(dict.fromkeys(report.problems))
    return report


def _versions(report: Report) -> dict[str, str | None]:
    from stagediff import __version__ as stagediff_version

    lines = report.section("versions")
    lines.append(f"stagediff          {stagediff_version} (Python {platform.python_version()}, {platform.system()} "
                 f"{platform.machine()}, {sys.executable})")
    versions = {package: version_of(package) for package in LIBRARIES}
    for package, version in versions.items():
        lines.append(f"{package:18s} {version or 'not installed'}")
    return versions


def _devices(report: Report, stages, backend: str, mesh: str | None) -> None:
    from stagediff.devices import accelerator_problems, backend_problem, gather_facts, stage_placement

    facts = gather_facts()
    lines = report.section("devices")
    if facts.torch_version is None:
        lines.append("torch         does not import")
    elif facts.cuda_device_name:
        lines.append(f"torch         cuda: {facts.cuda_device_name} ×{facts.cuda_device_count} (CUDA "
                     f"{facts.torch_cuda_build}), and cpu")
    else:
        build = f"CUDA {facts.torch_cuda_build} build, no usable GPU" if facts.torch_cuda_build else "CPU-only build"
        lines.append(f"torch         cpu ({build})")
    if facts.jax_backend is None:
        lines.append("jax           does not import")
    else:
        lines.append(f"jax           {facts.jax_backend}: {facts.jax_device_kind} ×{facts.jax_device_count}")
    lines.append(f"torchax       {'imports' if facts.torchax_error is None else 'does not import: ' + facts.torchax_error}")
    if facts.tpu_signs or facts.nvidia_signs:
        lines.append(f"accelerators  {', '.join(facts.tpu_signs + facts.nvidia_signs)}")
    stage_lines = report.section(f"stages (--backend {backend}{f' --mesh {mesh}' if mesh else ''})")
    stage_lines.extend(stage_placement(stage, backend, mesh, facts) for stage in stages)
    if any(stage != "encode" for stage in stages):
        if problem := backend_problem(backend, facts):
            report.problems.append(problem)
        report.problems.extend(accelerator_problems(facts))
        if mesh:
            from stagediff.devices import check_placement, resolved_backend

            try:
                check_placement(resolved_backend(backend, facts), mesh)
            except StagediffError as error:
                report.problems.append(str(error))


def _caches(report: Report, stages, backend: str) -> None:
    from stagediff.fingerprints import CACHE_VARIABLE as DIGEST_VARIABLE, digest_cache_folder
    from stagediff.gcs import MODEL_CACHE_VARIABLE, model_cache_root
    from tpu_ops.compile_cache import CACHE_VARIABLE as COMPILE_VARIABLE, default_cache_dir

    lines = report.section("caches")
    compile_cache = os.environ.get(COMPILE_VARIABLE) or default_cache_dir()
    caches = [("models", MODEL_CACHE_VARIABLE, str(model_cache_root()), True),
              ("compile", COMPILE_VARIABLE, compile_cache, any(stage != "encode" for stage in stages)),
              ("digests", DIGEST_VARIABLE, str(digest_cache_folder()), False)]
    for name, variable, location, needed in caches:
        origin = variable if os.environ.get(variable) else f"default; {variable} moves it"
        state = folder_state(location)
        lines.append(f"{name:13s} {location} ({origin}): {state}")
        if needed and state.startswith("not writable"):
            report.problems.append(f"{name} cache {location} is {state}")


def folder_state(location: str) -> str:
    """'off', 'exists, writable, N files', 'will be created (writable)', 'not writable ...' or, for a
    remote location, 'remote (not checked)'."""
    if location == "off":
        return "off"
    if "://" in location:
        return "remote (not checked here)"
    path = Path(location).expanduser()
    if path.exists():
        if not path.is_dir():
            return "not writable (not a folder)"
        if not os.access(path, os.W_OK | os.X_OK):
            return "not writable (permission denied)"
        return f"exists, writable, {sum(1 for _ in _walk_files(path, limit=100_000))} files"
    parent = path
    while not parent.exists():
        parent = parent.parent
    if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
        return "will be created (writable)"
    return f"not writable ({parent} does not allow creating it)"


def _walk_files(path: Path, limit: int):
    count = 0
    for _, _, files in os.walk(path):
        for _ in files:
            count += 1
            if count > limit:
                return
            yield


def _prefect(report: Report) -> None:
    from stagediff.prefect_api import api_request, prefect_api_url

    lines = report.section("prefect")
    url, source = prefect_api_url()
    if url is None:
        lines.append("API           none configured (set PREFECT_API_URL): `stagediff generate` runs in-process, "
                     "stage workers cannot start")
        return
    try:
        api_request(url, "/health")
    except Exception as error:
        lines.append(f"API           {url} (from {source}): unreachable ({one_line(error)})")
        report.problems.append(f"Prefect API {url} (from {source}) is unreachable: {one_line(error)}")
        return
    try:
        server = api_request(url, "/admin/version")
    except Exception:  # Prefect Cloud has no admin routes
        server = None
    lines.append(f"API           {url} (from {source}): reachable" + (f", server {server}" if server else ""))
    try:
        workers = api_request(url, "/task_workers/filter", body={})
    except Exception as error:
        lines.append(f"stage workers cannot be listed ({one_line(error)})")
        return
    lines.append(f"stage workers {len(workers)} connected" + (":" if workers else
                 " (a batch runs its stages in the generate run's own process)"))
    for worker in sorted(workers, key=lambda worker: worker.get("identifier", "")):
        stages = {served_stage(key) for key in worker.get("task_keys", [])}
        served = ", ".join(sorted(stages, key=lambda stage: (STAGES + (stage,)).index(stage)))
        lines.append(f"  {worker.get('identifier', '?')}: {served}")


def served_stage(task_key: str) -> str:
    """The stage of a stage task's key (`encode_task-<code hash>`, as `tasks.stage_tasks` names them)."""
    name = task_key.rsplit("-", 1)[0]
    return name.removesuffix("_task")


def _store(report: Report, uri: str) -> None:
    from stagediff.store import Store

    lines = report.section("store")
    try:
        Store(uri).check_writable()
    except StagediffError as error:
        lines.append(f"{uri}: {error}")
        report.problems.append(str(error))
    except Exception as error:  # a malformed URI, an unknown protocol
        lines.append(f"{uri}: {one_line(error)}")
        report.problems.append(f"store {uri}: {one_line(error)}")
    else:
        lines.append(f"{uri}: reachable and writable")


def doctor(args) -> int:
    """The `stagediff doctor` command."""
    from stagediff.request import BACKENDS

    if args.backend not in BACKENDS:
        raise StagediffError(f"--backend {args.backend!r} is not one of {', '.join(BACKENDS)}")
    report = diagnose(parse_stages(args.stage), args.backend, args.mesh, args.store)
    print(report.text(), end="")
    for problem in report.problems:
        print(f"stagediff doctor: {problem}", file=sys.stderr)
    return 1 if report.problems else 0
