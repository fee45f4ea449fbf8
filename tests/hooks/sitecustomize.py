"""Test-only fault injection, loaded by processes started with tests/hooks on PYTHONPATH (Python
imports `sitecustomize` at start-up). `STAGEDIFF_TEST_FAIL_ONCE=<stage>:<marker-file>` makes the first
run of that stage (`stagediff.stages.run_stage`) raise a transient error (and create the marker);
later runs go on normally. Nothing in the product reads this variable."""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

TARGET_MODULE = "stagediff.stages"
TARGET_FUNCTION = "run_stage"


class InjectedFailure(RuntimeError):
    """A transient failure raised on purpose by the test hook."""


def _fail_first_run(function, stage: str, marker: Path):
    @functools.wraps(function)
    def wrapper(stage_name, *args, **kwargs):
        if stage_name == stage and not marker.exists():
            marker.touch()
            raise InjectedFailure(f"{stage}: injected transient failure (test hook)")
        return function(stage_name, *args, **kwargs)

    return wrapper


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Wraps the stage runner once `stagediff.stages` has been executed."""

    def __init__(self, stage: str, marker: Path):
        self.stage, self.marker = stage, marker

    def find_spec(self, name, path=None, target=None):
        if name != TARGET_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            setattr(module, TARGET_FUNCTION, _fail_first_run(getattr(module, TARGET_FUNCTION), self.stage, self.marker))

        spec.loader.exec_module = exec_module
        return spec


_stage, _, _marker = os.environ.get("STAGEDIFF_TEST_FAIL_ONCE", "").partition(":")
if _stage and _marker:
    sys.meta_path.insert(0, _PatchAfterImport(_stage, Path(_marker)))
