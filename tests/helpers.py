"""Small helpers shared by the tests."""

from __future__ import annotations

import io
import json
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from uuid import UUID

import numpy as np
import pytest
from PIL import Image
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.states import Cancelling

from stagediff import stages
from stagediff.plan import make_plan
from stagediff.request import Request


def run_all_stages(request: Request) -> dict[str, stages.StageResult]:
    """encode → denoise → decode for a request, as the generate flow does without Prefect."""
    plan = make_plan(request)
    return {
        "encode": stages.encode(plan),
        "denoise": stages.denoise(plan),
        "decode": stages.decode(plan),
    }


def stored_item(request: Request, prompt: str, seed: int):
    """(latents tensor, uint8 pixels) that the store holds for one (prompt, seed)."""
    plan = make_plan(request)
    item = next(i for i in plan.items if i.prompt == prompt and i.seed == seed)
    latents = plan.store.read_tensors(item.latents_path, item.latents_key)["latents"]
    pixels = None
    if item.media_path.endswith(".png") and plan.store.exists(item.media_path):
        pixels = np.asarray(Image.open(io.BytesIO(plan.store.read_bytes(item.media_path))).convert("RGB"))
    return latents, pixels


def garble_body(path: Path) -> None:
    """Flip the last bytes of a safetensors file: its header (what planning reads) stays intact."""
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])
    path.write_bytes(bytes(data))


def snapshot(folder: Path) -> dict[str, float]:
    """Relative path -> modification time of every file under a store folder."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


# -- the real Prefect server (fixtures `prefect_stack`, `prefect_client`) ---------------------------
HOOKS = Path(__file__).parent / "hooks"
"""Test-only hooks (sitecustomize.py): put on a worker's PYTHONPATH to inject faults."""


def run_deployment_cli(stack, name: str, parameters: dict, watch: bool = True):
    """`prefect deployment run NAME --params JSON [--watch]`, as a user types it."""
    return stack.prefect("deployment", "run", name, "--params", json.dumps(parameters), *(["--watch"] if watch else []),
                         check=False)


@contextmanager
def deployment_run(stack, client, name: str, parameters: dict):
    """`prefect deployment run NAME --params JSON`, not watched; yields the id of the flow run it created and
    cancels that run if it is still going when the block ends (a failed test leaves no batch running into
    the next one)."""
    result = run_deployment_cli(stack, name, parameters, watch=False)
    created = re.search(r"UUID: ([0-9a-f-]{36})", result.stdout)
    assert result.returncode == 0 and created, result.stdout + result.stderr
    run_id = UUID(created.group(1))
    try:
        yield run_id
    finally:
        state = client.read_flow_run(run_id).state
        if state is None or not state.is_final():
            client.set_flow_run_state(run_id, Cancelling(), force=True)


def latest_run(client, flow_name: str):
    runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])), sort="START_TIME_DESC", limit=1)
    return runs[0]


def wait_for_state(client, run_id, predicate, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        if run.state and predicate(run.state):
            return run
        time.sleep(1)
    raise AssertionError(f"flow run {run_id} stayed {run.state.name}")


def one_line_error(args: list[str], capsys) -> str:
    """Run the `stagediff` command in-process with `args`; check that it fails with exit code 2 and one
    error line, and return that line."""
    from stagediff.cli import main

    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main(args))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("stagediff: error: ") and error.count("\n") == 1, error
    return error
