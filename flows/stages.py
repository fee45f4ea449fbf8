"""One flow per stage, for the work pools: `encode` on cpu-pool, `denoise` and `decode` on tpu-pool.

Each processes a whole chunk of items (its `prompts` × `seeds`), so model loading and compilation are
paid once per chunk, and skips whatever the store already holds.
"""

from __future__ import annotations

from flows.parameters import generation_flow
from stagediff.options import request_from_options
from tasks import decode_task, denoise_task, encode_task

STAGE_TASKS = {"encode": encode_task, "denoise": denoise_task, "decode": decode_task}


def _stage_body(stage: str):
    def body(parameters: dict) -> list[str]:
        request = request_from_options(parameters)
        return STAGE_TASKS[stage](request.to_dict())

    return body


encode = generation_flow("encode", _stage_body("encode"), "Encode the prompts into embeddings (CPU).", retries=1)
denoise = generation_flow("denoise", _stage_body("denoise"), "Denoise every (prompt, seed) into latents.", retries=1)
decode = generation_flow("decode", _stage_body("decode"), "Decode latents into PNG or MP4 files.", retries=1)
