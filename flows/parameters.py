"""One parameter list for every generation flow, mirroring the CLI's long options (snake_case, lists
plural). Prefect validates the types before a run starts; `request_from_parameters` then validates
the values, so a bad parameter fails the run at once with a one-line message."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from prefect import flow

from stagediff.request import DEFAULT_STORE, Request

Dispatch = Literal["auto", "in-process", "deployments"]
ORCHESTRATION_PARAMETERS = ("run_name", "manifest", "dispatch", "prompts_per_chunk")
"""Flow parameters that steer the run rather than describe the request."""
FAMILY_OPTIONS = ("flow_shift", "true_cfg")
"""Flow parameters that go to `Request.extras` (options of some families only)."""


def request_from_parameters(parameters: dict) -> Request:
    """The validated Request behind a generation flow's parameters."""
    options = {k: v for k, v in parameters.items() if k not in ORCHESTRATION_PARAMETERS}
    extras = {name: options.pop(name, None) for name in FAMILY_OPTIONS}
    return Request(**options, extras=extras)


def generation_flow(name: str, body: Callable[[dict], Any], description: str, **flow_options):
    """A Prefect flow named `name` taking the generation parameters and calling `body(parameters)`."""

    def run(
        model: str,
        prompts: list[str],
        seeds: list[int],
        negative_prompt: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        height: int | None = None,
        width: int | None = None,
        frames: int | None = None,
        fps: int | None = None,
        flow_shift: float | None = None,
        true_cfg: float | None = None,
        dtype: Literal["float32", "bfloat16"] = "float32",
        store: str = DEFAULT_STORE,
        backend: Literal["auto", "torch", "torchax"] = "auto",
        batch_size: int = 1,
        mesh: str | None = None,
        run_name: str | None = None,
        manifest: str | None = None,
        dispatch: Dispatch = "auto",
        prompts_per_chunk: int | None = None,
    ):
        parameters = {name: value for name, value in locals().items() if name != "body"}
        return body(parameters)

    run.__name__ = run.__qualname__ = name
    run.__doc__ = description
    return flow(name=name, description=description, **flow_options)(run)
