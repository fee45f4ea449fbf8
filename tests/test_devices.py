"""Where the stages compute, said before any work, and accelerators present but unusable: the messages
from explicit facts (no hardware faked), and the real machine's report through the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stagediff.devices import (CUDA_FIX, TPU_FIX, HostFacts, accelerator_problems, backend_problem, gather_facts,
                               host_signs, placement_report, stage_placement)

PROJECT = Path(__file__).resolve().parents[1]
CPU_HOST = HostFacts(jax_backend="cpu", jax_device_kind="cpu", jax_device_count=1, torch_version="2.13.0+cpu")
TPU_HOST = HostFacts(tpu_signs=("/dev/accel0",), jax_backend="tpu", jax_device_kind="TPU v6 lite", jax_device_count=8,
                     libtpu="0.0.42.1", torch_version="2.13.0+cpu")
GPU_HOST = HostFacts(nvidia_signs=("/dev/nvidia0",), jax_backend="cpu", jax_device_kind="cpu", jax_device_count=1,
                     torch_version="2.13.0+cu128", torch_cuda_build="12.8", cuda_device_name="NVIDIA H100 80GB HBM3",
                     cuda_device_count=1)


def test_tpu_vm_without_libtpu_is_named_with_its_fix():
    facts = HostFacts(tpu_signs=("/dev/accel0", "/dev/accel1"), jax_backend="cpu", jax_device_kind="cpu",
                      jax_device_count=1, torch_version="2.13.0+cpu")
    [problem] = accelerator_problems(facts)
    assert "/dev/accel0" in problem and "no libtpu" in problem and TPU_FIX in problem
    assert "\n" not in problem


def test_tpu_pod_seen_from_its_environment_without_libtpu():
    facts = HostFacts(tpu_signs=("TPU_ACCELERATOR_TYPE=v6e-8",), jax_backend="cpu", torch_version="2.13.0+cpu")
    [problem] = accelerator_problems(facts)
    assert "TPU_ACCELERATOR_TYPE=v6e-8" in problem and TPU_FIX in problem


def test_tpu_with_libtpu_but_held_elsewhere_names_no_install():
    facts = HostFacts(tpu_signs=("/dev/vfio/0",), jax_backend="cpu", libtpu="0.0.42.1", torch_version="2.13.0+cpu")
    [problem] = accelerator_problems(facts)
    assert "libtpu 0.0.42.1 is installed" in problem and "another process" in problem and TPU_FIX not in problem


def test_gpu_with_cpu_only_torch_is_named_with_the_cuda_wheel():
    facts = HostFacts(nvidia_signs=("/dev/nvidia0", "nvidia-smi"), jax_backend="cpu", torch_version="2.13.0+cpu")
    [problem] = accelerator_problems(facts)
    assert "/dev/nvidia0" in problem and "CPU-only" in problem and CUDA_FIX in problem
    assert "--index-url https://download.pytorch.org/whl/cu128" in problem


def test_gpu_with_cuda_torch_that_cannot_use_it_points_at_the_driver():
    facts = HostFacts(nvidia_signs=("nvidia-smi",), torch_version="2.13.0+cu128", torch_cuda_build="12.8")
    [problem] = accelerator_problems(facts)
    assert "CUDA 12.8" in problem and "driver" in problem


@pytest.mark.parametrize("facts", [CPU_HOST, TPU_HOST, GPU_HOST])
def test_usable_hosts_have_no_problems(facts):
    assert accelerator_problems(facts) == []
    assert backend_problem("auto", facts) is None


def test_torchax_that_does_not_import_is_a_one_line_error_naming_it():
    facts = HostFacts(jax_backend="cpu", torch_version="2.13.0+cpu", torchax_error="ModuleNotFoundError: No module "
                      "named 'torchax'")
    problem = backend_problem("torchax", facts)
    assert problem.startswith("--backend torchax: torchax does not import here") and "\n" not in problem
    assert backend_problem("torch", facts) is None
    assert backend_problem("auto", facts) is None  # auto on a CPU is torch


def test_auto_on_a_tpu_host_needs_torchax():
    facts = HostFacts(**{**TPU_HOST.__dict__, "torchax_error": "ImportError: boom"})
    assert "torchax does not import" in backend_problem("auto", facts)


def test_placement_lines_say_backend_devices_and_mesh():
    assert stage_placement("encode", "auto", None, TPU_HOST).startswith("encode: torch on cpu")
    assert stage_placement("denoise", "auto", "tp=8", TPU_HOST) == \
        "denoise: torchax (--backend auto) on TPU v6 lite ×8 (jax tpu), mesh tp=8"
    assert "mesh chosen per model" in stage_placement("decode", "torchax", None, TPU_HOST)
    assert stage_placement("denoise", "auto", None, GPU_HOST) == \
        "denoise: torch (--backend auto) on cuda NVIDIA H100 80GB HBM3 ×1 (uses one), no mesh (one device)"
    assert stage_placement("decode", "torch", None, CPU_HOST) == "decode: torch on cpu ×1, no mesh (one device)"


def test_report_adds_the_unusable_accelerator_after_the_stages():
    facts = HostFacts(tpu_signs=("/dev/accel0",), jax_backend="cpu", jax_device_kind="cpu", jax_device_count=1,
                      torch_version="2.13.0+cpu")
    lines = placement_report(["denoise", "decode"], "auto", None, facts)
    assert [line.split(":")[0] for line in lines[:2]] == ["denoise", "decode"]
    assert len(lines) == 3 and TPU_FIX in lines[2]


def test_host_signs_read_device_files_and_environment(tmp_path):
    (tmp_path / "accel0").touch()
    (tmp_path / "vfio").mkdir()
    (tmp_path / "vfio" / "vfio").touch()  # the vfio module alone is no TPU
    (tmp_path / "vfio" / "3").touch()
    (tmp_path / "nvidia0").touch()
    (tmp_path / "nvidiactl").touch()
    tpu, nvidia = host_signs(tmp_path, {"TPU_WORKER_ID": "0", "TPU_NAME": ""}, which=lambda name: None)
    assert tpu == (str(tmp_path / "accel0"), str(tmp_path / "vfio" / "3"), "TPU_WORKER_ID=0")
    assert nvidia == (str(tmp_path / "nvidia0"),)


def test_this_machine_has_usable_devices():
    facts = gather_facts()
    assert facts.torch_version and facts.jax_backend and facts.torchax_error is None
    assert accelerator_problems(facts) == []


def run_cli(*args, env=None, cwd):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(PROJECT), "PREFECT_API_URL": "", **(env or {})},
                          timeout=600)


def test_generate_says_where_each_stage_runs(tiny_sdxl, tmp_path):
    result = run_cli("generate", "--model", str(tiny_sdxl), "--prompt", "a fox", "--seed", "0", "--steps", "2",
                     "--height", "64", "--width", "64", "--store", str(tmp_path / "store"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("stagediff: ")]
    assert lines[:3] == ["stagediff: encode: torch on cpu ×1 (text encoders run on the CPU)",
                         "stagediff: denoise: torch (--backend auto) on cpu ×1, no mesh (one device)",
                         "stagediff: decode: torch (--backend auto) on cpu ×1, no mesh (one device)"]


def test_backend_torchax_without_torchax_fails_before_any_work(tiny_sdxl, tmp_path):
    # torchax made unimportable for real: a package of that name that refuses to import comes first.
    shadow = tmp_path / "shadow" / "torchax"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('torchax is not installed in this image')\n")
    store = tmp_path / "store"
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "generate", "--model", str(tiny_sdxl), "--prompt", "a fox", "--seed", "0",
         "--steps", "2", "--height", "64", "--width", "64", "--backend", "torchax", "--store", str(store)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": f"{tmp_path / 'shadow'}{os.pathsep}{PROJECT}", "PREFECT_API_URL": ""})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["stagediff: error: --backend torchax: torchax does not import here (ImportError: torchax is "
                      "not installed in this image); install it: .venv/bin/pip install -c requirements.lock -e ."]
    assert not list(store.rglob("*.safetensors")) and not list(store.rglob("*.png"))


def test_a_cpu_run_asks_jax_nothing():
    code = ("import sys; from stagediff.devices import check_stages_here; "
            "check_stages_here(('encode', 'denoise', 'decode'), 'auto', None, say=lambda line: None); "
            "print('jax' in sys.modules, 'torchax' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_facts_for_torchax_include_jax_devices_and_torchax():
    facts = gather_facts("torchax")
    assert facts.jax_backend == "cpu" and facts.jax_device_count >= 1 and facts.torchax_error is None


def test_a_stage_on_a_worker_without_torchax_refuses_torchax_before_loading(tmp_path):
    """The check where a stage runs (a stage worker, a stage flow run): `check_placement`."""
    shadow = tmp_path / "shadow" / "torchax"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no torchax here')\n")
    code = ("from stagediff.devices import check_placement\nfrom stagediff.errors import StagediffError\n"
            "check_placement('torch', None)\ntry:\n    check_placement('torchax', None)\n"
            "except StagediffError as error:\n    print(error)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True,
                            env={**os.environ, "PYTHONPATH": f"{tmp_path / 'shadow'}{os.pathsep}{PROJECT}"})
    assert result.stdout.strip() == ("--backend torchax: torchax does not import here (ImportError: no torchax here); "
                                     "install it: .venv/bin/pip install -c requirements.lock -e .")
