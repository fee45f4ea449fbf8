"""Prefect flows whose parameters are options of `stagediff.options` (the CLI's long options in
snake_case, lists plural). Prefect validates the types before a run starts; `request_from_options`
then validates the values, so a bad parameter fails the run at once with a one-line message."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

from prefect import flow

from stagediff.options import Option


def generation_flow(name: str, body: Callable[[dict], Any], description: str, options: Iterable[Option],
                    **flow_options):
    """A Prefect flow named `name` whose keyword parameters are `options` (shown with their help in
    the UI); it calls `body(parameters)` with every parameter by name."""
    options = tuple(options)

    def run(**parameters):
        return body(parameters)

    run.__signature__ = inspect.Signature([
        inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, annotation=o.annotation,
                          **({} if o.required else {"default": o.default_value}))
        for o in options
    ])
    run.__name__ = run.__qualname__ = name
    # Prefect reads parameter descriptions from the docstring's Args section.
    run.__doc__ = "\n".join([description, "", "Args:", *(f"    {o.name}: {o.help}" for o in options)])
    return flow(name=name, description=description, **flow_options)(run)
