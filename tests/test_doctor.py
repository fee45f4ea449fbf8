"""`stagediff doctor`: what this machine has for each stage, the Prefect API and its stage workers, a
store; exit 1 naming what a given stage or store needs and lacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from stagediff.doctor import folder_state, parse_stages, served_stage

PROJECT = Path(__file__).resolve().parents[1]


def doctor(*args, cwd: Path, env: dict | None = None, pythonpath: str = str(PROJECT)):
    environment = {**os.environ, "PYTHONPATH": pythonpath, "PREFECT_API_URL": "",
                   "PREFECT_HOME": str(cwd / "prefect-home"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "flows.cli", "doctor", *args], cwd=cwd, capture_output=True,
                          text=True, env=environment, timeout=300)


def test_doctor_reports_versions_devices_caches_and_a_writable_store(tmp_path):
    result = doctor("--store", str(tmp_path / "store"), cwd=tmp_path,
                    env={"STAGEDIFF_MODEL_CACHE": str(tmp_path / "models")})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for line in ("torch              2.13.0", "jax                0.10", "torchax            0.0.14", "diffusers          0.42",
                 "prefect            3.8.8", "torch         cpu (CPU-only build)", "jax           cpu: cpu ×",
                 "torchax       imports", "encode: torch on cpu ×1", "denoise: torch (--backend auto) on cpu ×1",
                 f"models        {tmp_path / 'models'} (STAGEDIFF_MODEL_CACHE): will be created (writable)",
                 "API           none configured", f"{tmp_path / 'store'}: reachable and writable"):
        assert line in out, line
    assert result.stderr == ""


def test_unwritable_store_exits_1_with_one_line_naming_it(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    store = blocker / "store"
    result = doctor("--store", str(store), cwd=tmp_path)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"stagediff doctor: store {store} is not writable")


def test_unreachable_prefect_api_is_named(tmp_path):
    result = doctor("--stage", "encode", cwd=tmp_path, env={"PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("stagediff doctor: Prefect API http://127.0.0.1:9/api (from PREFECT_API_URL) is unreachable")


def test_api_from_the_active_profile(tmp_path):
    home = tmp_path / "prefect-home"
    home.mkdir()
    (home / "profiles.toml").write_text('active = "remote"\n[profiles.remote]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n')
    result = doctor(cwd=tmp_path)
    assert "API           http://127.0.0.1:9/api (from profile 'remote'): unreachable" in result.stdout
    assert result.returncode == 1


def test_denoise_with_torchax_that_does_not_import_exits_1(tmp_path):
    shadow = tmp_path / "shadow" / "torchax"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no torchax in this image')\n")
    pythonpath = f"{tmp_path / 'shadow'}{os.pathsep}{PROJECT}"
    result = doctor("--stage", "denoise", "--backend", "torchax", cwd=tmp_path, pythonpath=pythonpath)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["stagediff doctor: --backend torchax: torchax does not import here "
                                          "(ImportError: no torchax in this image); install it: .venv/bin/pip install "
                                          "-c requirements.lock -e ."]
    assert "denoise: torchax on cpu ×" in result.stdout
    # the encode stage needs no torchax
    assert doctor("--stage", "encode", "--backend", "torchax", cwd=tmp_path, pythonpath=pythonpath).returncode == 0


def test_a_cache_a_stage_needs_that_cannot_be_created_fails(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = doctor("--stage", "decode", cwd=tmp_path, env={"STAGEDIFF_COMPILE_CACHE": str(blocker / "jax")})
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"stagediff doctor: compile cache {blocker / 'jax'} is not writable")
    # encode compiles nothing
    assert doctor("--stage", "encode", cwd=tmp_path, env={"STAGEDIFF_COMPILE_CACHE": str(blocker / "jax")}).returncode == 0


def test_bad_stage_is_a_one_line_usage_error(tmp_path):
    result = doctor("--stage", "denoise,upscale", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["stagediff: error: --stage upscale: stages are encode, denoise, decode"]


def test_stage_values_repeat_or_comma_separate():
    assert parse_stages(None) == ("encode", "denoise", "decode")
    assert parse_stages(["decode,denoise"]) == ("denoise", "decode")
    assert parse_stages(["encode", "decode"]) == ("encode", "decode")


def test_served_stage_of_task_keys():
    assert served_stage("encode_task-0123abcd") == "encode"
    assert served_stage("denoise_task-unknown") == "denoise"


def test_folder_states(tmp_path):
    assert folder_state("off") == "off"
    assert folder_state("gs://bucket/jax") == "remote (not checked here)"
    assert folder_state(str(tmp_path / "new" / "deeper")) == "will be created (writable)"
    (tmp_path / "one").write_text("x")
    assert folder_state(str(tmp_path)) == "exists, writable, 1 files"


def test_the_command_line_imports_no_torch_for_doctor():
    code = ("import sys; from stagediff import cli, doctor; cli.build_parser().parse_args(['doctor']); "
            "print(sorted(name for name in ('torch', 'jax', 'diffusers', 'transformers', 'prefect') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT, check=True)
    assert result.stdout.strip() == "[]"


def test_doctor_shows_the_stage_workers_connected_to_the_server(prefect_stack, tmp_path):
    result = doctor("--store", str(tmp_path / "store"), cwd=tmp_path, env={"PREFECT_API_URL": prefect_stack.api_url})
    assert result.returncode == 0, result.stderr
    assert f"API           {prefect_stack.api_url} (from PREFECT_API_URL): reachable, server 3.8.8" in result.stdout
    assert "stage workers 2 connected:" in result.stdout
    served = [line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("    ")]
    assert sorted(served) == ["denoise, decode", "encode"]
    # and each stage worker said at its start where its stages compute
    encode_log = (prefect_stack.logs / "stage-encode.log").read_text()
    accelerator_log = (prefect_stack.logs / "stage-accelerator-0.log").read_text()
    assert "Devices: encode: torch on cpu ×1" in encode_log
    assert "Devices: denoise: torch (--backend auto) on cpu ×1" in accelerator_log
    assert "Devices: decode: torch (--backend auto) on cpu ×1" in accelerator_log
