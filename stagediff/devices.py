"""Where the stages compute on this machine, said before any work: each stage's backend, device kind and
count, and mesh; and an accelerator that is present but that the installed libraries cannot use (a TPU
VM with JAX's CPU build, an NVIDIA GPU with torch's CPU wheel), named with its fix.

The messages are pure functions of `HostFacts`, so they are tested with the facts written out;
`gather_facts()` reads the real machine (it imports torch, jax and torchax: call it where a stage is
about to run, not at import time).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from stagediff.errors import StagediffError, one_line
from stagediff.plan import ENCODE

TPU_ENV_VARIABLES = ("TPU_NAME", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES",
                     "TPU_CHIPS_PER_HOST_BOUNDS", "TPU_TOPOLOGY")
"""Set on TPU VMs and by GKE in TPU pods (not `TPU_SKIP_MDS_QUERY`: importing jax sets it anywhere)."""
TPU_FIX = "install libtpu: .venv/bin/pip install -c requirements.lock -e '.[tpu]'"
CUDA_FIX = ("install torch's CUDA wheel: .venv/bin/pip install torch==2.13.0+cu128 "
            "--index-url https://download.pytorch.org/whl/cu128")
TORCHAX_FIX = "install it: .venv/bin/pip install -c requirements.lock -e ."


@dataclass(frozen=True)
class HostFacts:
    """What decides where the stages can compute here."""

    tpu_signs: tuple[str, ...] = ()
    """Why this looks like a TPU host: device files (/dev/accel0, /dev/vfio/0) or TPU variables."""
    nvidia_signs: tuple[str, ...] = ()
    """Why this looks like an NVIDIA GPU host: /dev/nvidia0, nvidia-smi on PATH."""
    jax_backend: str | None = None
    """`jax.default_backend()` ('tpu', 'gpu', 'cpu'); None when jax does not import."""
    jax_device_kind: str | None = None
    jax_device_count: int = 0
    libtpu: str | None = None
    """The installed libtpu's version, None when not installed."""
    torch_version: str | None = None
    torch_cuda_build: str | None = None
    """`torch.version.cuda`: the CUDA version torch was built for, None for a CPU-only wheel."""
    cuda_device_name: str | None = None
    """The first CUDA device's name when torch can use one, else None."""
    cuda_device_count: int = 0
    torchax_error: str | None = None
    """Why `import torchax` fails here, None when it imports."""


def host_signs(dev: Path = Path("/dev"), environ=os.environ, which=shutil.which) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(TPU signs, NVIDIA signs) of this machine, from device files, the environment and PATH only."""
    tpu = [str(path) for path in sorted(dev.glob("accel[0-9]*"))]
    # /dev/vfio/vfio exists wherever the vfio module is loaded; numbered groups are devices (TPU v5e, v6e).
    tpu += [str(path) for path in sorted((dev / "vfio").glob("[0-9]*"))]
    tpu += [f"{name}={environ[name]}" for name in TPU_ENV_VARIABLES if environ.get(name)]
    nvidia = [str(path) for path in sorted(dev.glob("nvidia[0-9]*"))]
    if which("nvidia-smi"):
        nvidia.append("nvidia-smi")
    return tuple(tpu), tuple(nvidia)


def gather_facts(backend: str | None = None) -> HostFacts:
    """The facts of this machine: imports torch, jax and torchax (and initialises their devices). With
    `backend` (what the stages are asked for), only what that choice and its messages need, so a CPU
    run pays for no jax: jax where torchax is asked for or the host shows TPU signs, torchax where the
    backend resolves to it."""
    from importlib import metadata

    tpu_signs, nvidia_signs = host_signs()
    needs_jax = backend is None or backend == "torchax" or bool(tpu_signs)
    facts: dict = {"tpu_signs": tpu_signs, "nvidia_signs": nvidia_signs}
    try:
        facts["libtpu"] = metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        pass
    try:
        import torch

        facts["torch_version"] = torch.__version__
        facts["torch_cuda_build"] = torch.version.cuda
        if torch.cuda.is_available():
            facts["cuda_device_name"] = torch.cuda.get_device_name(0)
            facts["cuda_device_count"] = torch.cuda.device_count()
    except Exception:  # reported as torch missing; the stages themselves need it and say so
        pass
    if needs_jax:
        try:
            import jax

            facts["jax_backend"] = jax.default_backend()
            devices = jax.devices()
            facts["jax_device_kind"] = devices[0].device_kind
            facts["jax_device_count"] = len(devices)
        except Exception:
            pass
        if backend is None or resolved_backend(backend, HostFacts(**facts)) == "torchax":
            facts["torchax_error"] = torchax_import_error()
    return HostFacts(**facts)


def torchax_import_error() -> str | None:
    try:
        import torchax  # noqa: F401
    except Exception as error:  # not only ImportError: a torchax built for another torch fails otherwise
        return f"{type(error).__name__}: {one_line(error)}"
    return None


def accelerator_problems(facts: HostFacts) -> list[str]:
    """One line per accelerator that is present but unusable with what is installed, naming the fix."""
    problems = []
    if facts.tpu_signs and facts.jax_backend != "tpu":
        found = ", ".join(facts.tpu_signs[:3])
        if facts.jax_backend is None:
            problems.append(f"a TPU is attached ({found}) but jax does not import: {TPU_FIX}")
        elif facts.libtpu is None:
            problems.append(f"a TPU is attached ({found}) but JAX runs on the {facts.jax_backend} (no libtpu): {TPU_FIX}")
        else:
            problems.append(f"a TPU is attached ({found}) but JAX runs on the {facts.jax_backend} although libtpu "
                            f"{facts.libtpu} is installed: another process may hold the TPU (see `lsof -w /dev/accel*`)")
    if facts.nvidia_signs and facts.cuda_device_name is None:
        found = ", ".join(facts.nvidia_signs[:3])
        if facts.torch_version is None:
            problems.append(f"an NVIDIA GPU is present ({found}) but torch does not import: {CUDA_FIX}")
        elif facts.torch_cuda_build is None:
            problems.append(f"an NVIDIA GPU is present ({found}) but torch {facts.torch_version} is a CPU-only "
                            f"build: {CUDA_FIX}")
        else:
            problems.append(f"an NVIDIA GPU is present ({found}) but torch {facts.torch_version} (CUDA "
                            f"{facts.torch_cuda_build}) cannot use it: check the driver with nvidia-smi")
    return problems


def resolved_backend(requested: str, facts: HostFacts) -> str:
    """`stagediff.backends.resolve_backend` from the facts: auto is torchax on TPU, torch elsewhere."""
    if requested != "auto":
        return requested
    return "torchax" if facts.jax_backend == "tpu" else "torch"


def backend_problem(requested: str, facts: HostFacts) -> str | None:
    """Why the denoise and decode stages cannot run with `requested` here (one line), or None."""
    if resolved_backend(requested, facts) == "torchax":
        if facts.torchax_error is not None:
            return f"--backend {requested}: torchax does not import here ({facts.torchax_error}); {TORCHAX_FIX}"
        if facts.jax_backend is None:
            return f"--backend {requested}: jax does not import here; {TORCHAX_FIX}"
    elif facts.torch_version is None:
        return f"--backend {requested}: torch does not import here; {TORCHAX_FIX}"
    return None


def stage_placement(stage: str, requested: str, mesh: str | None, facts: HostFacts) -> str:
    """Where a stage computes here, in words: backend, device kind × count, mesh."""
    if stage == ENCODE:
        return f"{stage}: torch on cpu ×1 (text encoders run on the CPU)"
    backend = resolved_backend(requested, facts)
    if backend == "torchax":
        where = f"{facts.jax_device_kind or facts.jax_backend} ×{facts.jax_device_count} (jax {facts.jax_backend})"
        if mesh:
            layout = f"mesh {mesh}"
        elif facts.jax_backend == "tpu" and facts.jax_device_count > 1:
            layout = "mesh chosen per model at load (dp and tp over the chips)"
        else:
            layout = "no mesh (one device)"
    else:
        if facts.cuda_device_name is not None:
            where = f"cuda {facts.cuda_device_name} ×{facts.cuda_device_count} (uses one)"
        else:
            where = "cpu ×1"
        layout = "no mesh (one device)"
    chosen = f" (--backend {requested})" if requested == "auto" else ""
    return f"{stage}: {backend}{chosen} on {where}, {layout}"


def placement_report(stages, requested: str, mesh: str | None, facts: HostFacts) -> list[str]:
    """The lines to log before the stages run: one per stage, then any unusable accelerator."""
    return [stage_placement(stage, requested, mesh, facts) for stage in stages] + accelerator_problems(facts)


def check_placement(backend: str, mesh: str | None) -> None:
    """Fail with a one-line error, where the stage runs and before it writes anything, for a backend
    that does not import here (torchax) or a mesh that the backend (resolved here) or this machine's
    devices cannot take."""
    if backend == "torchax":
        if error := torchax_import_error():
            raise StagediffError(f"--backend torchax: torchax does not import here ({error}); {TORCHAX_FIX}")
    if mesh is None:
        return
    if backend != "torchax":
        raise StagediffError(f"--mesh {mesh} needs --backend torchax")
    from tpu_ops.mesh import MeshError, make_mesh

    try:
        make_mesh(mesh)
    except MeshError as error:
        raise StagediffError(str(error)) from None


def check_stages_here(stages, requested: str, mesh: str | None, say=print) -> HostFacts:
    """For stages that run in this process: fail (one line, nothing else said) when the backend the
    denoise and decode stages need is missing here or the mesh does not fit its devices, before any
    work; then say where each stage will compute."""
    facts = gather_facts(requested if any(stage != ENCODE for stage in stages) else "torch")
    if any(stage != ENCODE for stage in stages):
        if problem := backend_problem(requested, facts):
            raise StagediffError(problem)
        if mesh:
            check_placement(resolved_backend(requested, facts), mesh)
    for line in placement_report(stages, requested, mesh, facts):
        say(line)
    return facts


def log_stage_devices(stages, logger) -> HostFacts:
    """A stage worker's start: where each stage it serves computes with the default backend (auto),
    unusable accelerators, and a torchax that runs asking for `--backend torchax` would miss."""
    facts = gather_facts()  # runs may ask for any backend: all of it
    for line in [stage_placement(stage, "auto", None, facts) for stage in stages]:
        logger.info("Devices: %s", line)
    for problem in accelerator_problems(facts):
        logger.warning("%s", problem)
    if any(stage != ENCODE for stage in stages) and (problem := backend_problem("torchax", facts)):
        logger.warning("runs with %s", problem)
    return facts
