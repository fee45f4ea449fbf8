"""How a stage run's parameters and result are written to Prefect's shared storage: JSON, never pickle.

A run handed to a stage worker carries, besides its parameters, the run context of the flow that
submitted it, and that context holds the flow object itself (Prefect pickles it by default). The
worker only needs the flow's name from it: the flow travels as its name and comes back as a flow of
that name that runs nothing. Everything else is Prefect's own JSON encoding.
"""

from __future__ import annotations

from typing import Any

from prefect import Flow
from prefect.serializers import JSONSerializer, prefect_json_object_decoder, prefect_json_object_encoder

FLOW_NAME_KEY = "__stagediff_flow_name__"


def encode(obj: Any) -> Any:
    """`json.dumps` default: a flow as its name, anything else as Prefect encodes it."""
    if isinstance(obj, Flow):
        return {FLOW_NAME_KEY: obj.name}
    return prefect_json_object_encoder(obj)


def decode(data: dict[str, Any]) -> Any:
    """`json.loads` object hook, the inverse of `encode`."""
    if FLOW_NAME_KEY in data:
        return Flow(_runs_elsewhere, name=data[FLOW_NAME_KEY])
    return prefect_json_object_decoder(data)


def _runs_elsewhere() -> None:
    """The body of a flow known by name only: the flow itself runs in the process that submitted the stage run."""


STAGE_RECORDS = JSONSerializer(object_encoder=f"{__name__}.encode", object_decoder=f"{__name__}.decode")
"""The serializer of the stage tasks' parameters and results."""
