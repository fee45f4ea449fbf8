"""The install extras: `.[tpu]` brings the libtpu that matches the jax pin, `.[kubernetes]` Prefect's
Kubernetes worker; both resolve against requirements.lock."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
NETWORK_ERRORS = ("NewConnectionError", "Max retries exceeded", "Network is unreachable", "Temporary failure in name",
                  "Could not fetch URL", "ConnectTimeout", "ReadTimeout")


def pyproject() -> dict:
    return tomllib.loads((PROJECT / "pyproject.toml").read_text())


def locked() -> dict[str, str]:
    pins = {}
    for line in (PROJECT / "requirements.lock").read_text().splitlines():
        name, _, version = line.strip().partition("==")
        if version:
            pins[canonical(name)] = version
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_spec(requirement: str, name: str) -> str | None:
    """The version specifier of `name` in a requirement string like `jax[tpu]>=0.10,<0.11`."""
    match = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?\s*(.*)", requirement.strip())
    return match.group(2) if match else None


def test_tpu_extra_is_jax_tpu_with_the_jax_pin():
    project = pyproject()["project"]
    jax_spec = next(spec for requirement in project["dependencies"]
                    if (spec := requirement_spec(requirement, "jax")) is not None)
    tpu = project["optional-dependencies"]["tpu"]
    assert [requirement_spec(requirement, "jax") for requirement in tpu] == [jax_spec]
    assert all(requirement.startswith("jax[tpu]") for requirement in tpu)


def test_every_extra_package_is_locked():
    pins = locked()
    for extra in ("test", "kubernetes"):
        for requirement in pyproject()["project"]["optional-dependencies"][extra]:
            name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
            assert canonical(name) in pins, f"{name} ({extra} extra) is not in requirements.lock"
    assert "libtpu" in pins, "the tpu extra's libtpu is not in requirements.lock"


def test_tpu_extra_resolves_with_the_lock():
    """pip resolves the extra's requirements (metadata only, nothing installed) to the locked jax and
    the locked libtpu; skipped only when the package index cannot be reached."""
    tpu = pyproject()["project"]["optional-dependencies"]["tpu"]
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--disable-pip-version-check", "--timeout", "15", "--retries", "1", "--report", "-",
               "-c", str(PROJECT / "requirements.lock"), *tpu]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and any(error in result.stderr for error in NETWORK_ERRORS):
        pytest.skip(f"package index unreachable: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    resolved = {canonical(item["metadata"]["name"]): item["metadata"]["version"] for item in report["install"]}
    pins = locked()
    assert resolved["jax"] == pins["jax"]
    assert resolved["libtpu"] == pins["libtpu"]
