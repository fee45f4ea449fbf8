"""One flow per stage, for the work pools (the ephemeral way to run stages): `encode` and `score` on
cpu-pool, `denoise` and `decode` on tpu-pool.

Each runs one unit of a batch (`stagediff.scheduler`: its prompts × seeds, narrowed to its `keys`; all
of them without keys), so model loading and compilation are paid once per unit, and skips whatever
the store already holds. The flows themselves do not retry: their stage task retries transient
failures, and bad input fails at once.
"""

from __future__ import annotations

from flows.parameters import generation_flow
from stagediff.options import GENERATION_OPTIONS, Option, request_from_options
from tasks import STAGE_TASKS

STAGE_FLOW_OPTIONS: tuple[Option, ...] = (
    *GENERATION_OPTIONS,
    Option("keys", str, "only these artifacts: embeddings keys for encode, latents keys for denoise and decode "
           "(default: every one of the request)", repeated=True, default=None),
)


def _stage_body(stage: str):
    def body(parameters: dict) -> list[str]:
        request = request_from_options(parameters)
        return STAGE_TASKS[stage](request.to_dict(), parameters["keys"])

    return body


def _stage_flow(stage: str, description: str):
    return generation_flow(stage, _stage_body(stage), description, options=STAGE_FLOW_OPTIONS)


encode = _stage_flow("encode", "Encode the prompts into embeddings (CPU).")
denoise = _stage_flow("denoise", "Denoise every (prompt, seed) into latents.")
decode = _stage_flow("decode", "Decode latents into PNG or MP4 files.")
score = _stage_flow("score", "Score the decoded items with the request's scorers (CPU).")
