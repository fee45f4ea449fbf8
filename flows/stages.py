"""One flow per stage, for the work pools (the ephemeral way to run stages): `encode` on cpu-pool,
`denoise` and `decode` on tpu-pool.

Each processes a whole chunk of items (its `prompts` × `seeds`), so model loading and compilation are
paid once per chunk, and skips whatever the store already holds. The flows themselves do not retry:
their stage task retries transient failures, and bad input fails at once.
"""

from __future__ import annotations

from flows.parameters import generation_flow
from stagediff.options import request_from_options
from tasks import STAGE_TASKS


def _stage_body(stage: str):
    def body(parameters: dict) -> list[str]:
        request = request_from_options(parameters)
        return STAGE_TASKS[stage](request.to_dict())

    return body


encode = generation_flow("encode", _stage_body("encode"), "Encode the prompts into embeddings (CPU).")
denoise = generation_flow("denoise", _stage_body("denoise"), "Denoise every (prompt, seed) into latents.")
decode = generation_flow("decode", _stage_body("decode"), "Decode latents into PNG or MP4 files.")
