"""Test-only fault injection, loaded by processes started with tests/hooks on PYTHONPATH (Python
imports `sitecustomize` at start-up). `STAGEDIFF_TEST_FAIL_ONCE=<stage>:<marker-file>` makes the first
run of that stage (`stagediff.stages.run_stage`) raise a transient error (and create the marker);
later runs go on normally. `STAGEDIFF_TEST_HANG_ONCE=<function>:<marker-file>` makes the first call of
that function of `stagediff.stages` (say `denoise_batch`) hang for good instead (a hung read, a wedged
device), after creating the marker. Nothing in the product reads these variables."""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import sys
import threading
from pathlib import Path

TARGET_MODULE = "stagediff.stages"


class InjectedFailure(RuntimeError):
    """A transient failure raised on purpose by the test hook."""


def _fail_first_run(stage: str, marker: Path):
    def wrap(run_stage):
        @functools.wraps(run_stage)
        def wrapper(stage_name, *args, **kwargs):
            if stage_name == stage and not marker.exists():
                marker.touch()
                raise InjectedFailure(f"{stage}: injected transient failure (test hook)")
            return run_stage(stage_name, *args, **kwargs)

        return wrapper

    return wrap


def _hang_first_call(marker: Path):
    def wrap(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            if not marker.exists():
                marker.touch()
                threading.Event().wait()  # until the process is killed
            return function(*args, **kwargs)

        return wrapper

    return wrap


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Wraps a function of `stagediff.stages` once the module has been executed."""

    def __init__(self, function: str, wrap):
        self.function, self.wrap = function, wrap

    def find_spec(self, name, path=None, target=None):
        if name != TARGET_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            setattr(module, self.function, self.wrap(getattr(module, self.function)))

        spec.loader.exec_module = exec_module
        return spec


_stage, _, _marker = os.environ.get("STAGEDIFF_TEST_FAIL_ONCE", "").partition(":")
if _stage and _marker:
    sys.meta_path.insert(0, _PatchAfterImport("run_stage", _fail_first_run(_stage, Path(_marker))))
_function, _, _hang_marker = os.environ.get("STAGEDIFF_TEST_HANG_ONCE", "").partition(":")
if _function and _hang_marker:
    sys.meta_path.insert(0, _PatchAfterImport(_function, _hang_first_call(Path(_hang_marker))))
