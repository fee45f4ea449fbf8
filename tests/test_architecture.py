"""The shape of the code: the light core and the flows import no tensor library, and no module of ours
imports another that imports it back (at module level or inside a function)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stagediff", "flows", "tasks", "tpu_ops")
HEAVY = ("torch", "jax", "diffusers", "transformers", "torchax")
LIGHT_CORE = ("stagediff.request", "stagediff.options", "stagediff.prompts", "stagediff.plan", "stagediff.models",
              "stagediff.fingerprints", "stagediff.hub", "stagediff.inventory", "stagediff.store", "stagediff.manifest",
              "stagediff.confinement", "stagediff.cache_spec", "stagediff.families", "stagediff.scheduler",
              "stagediff.contact_sheet", "stagediff.cli")
ORCHESTRATION = ("flows.generate", "flows.sweep", "flows.stages", "flows.cli", "tasks.worker")


def heavy_modules_after(code: str) -> list[str]:
    """The tensor libraries a fresh interpreter has imported after running `code`."""
    script = f"import json, sys\n{code}\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(Path.home())})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_light_core_and_the_orchestration_import_no_tensor_library():
    imports = "\n".join(f"import {module}" for module in LIGHT_CORE + ORCHESTRATION)
    assert heavy_modules_after(imports) == []


def test_planning_and_scheduling_a_batch_imports_no_tensor_library(tiny_sdxl, tmp_path):
    code = f"""
from stagediff.inventory import plan_state
from stagediff.plan import make_plan
from stagediff.request import Request
from stagediff.scheduler import schedule
plan = make_plan(Request(model={str(tiny_sdxl)!r}, prompts=["a red cat"], seeds=[0, 1], steps=2,
                         store={str(tmp_path)!r}, mesh="tp=8", backend="torchax"))
assert len(schedule(plan, plan_state(plan), accelerators=2)) == 5
"""
    assert heavy_modules_after(code) == []


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Our modules that a file imports, anywhere in it but under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for branch in ast.walk(tree)
               if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
               for node in ast.walk(branch)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                      for alias in node.names}
    return {name for name in found if name in modules}


def test_no_import_cycles():
    files = {_module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}
    graph = {name: _imports(path, set(files)) - {name} for name, path in files.items()}
    cycles, state = [], {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    # A package's __init__ importing its own modules is no cycle.
    cycles = [cycle for cycle in cycles if not all(part.startswith(cycle[0] + ".") or part == cycle[0]
                                                   for part in cycle)]
    assert cycles == [], "\n".join(" -> ".join(cycle) for cycle in cycles)
