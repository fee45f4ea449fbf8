"""The `generate` flow: a batch of prompts × seeds through encode → denoise → decode.

Work is split per prompt so that encoding the next prompt overlaps denoising the previous one;
each stage skips whatever the store already holds, so a rerun only does the missing work.
"""

from __future__ import annotations

import time
import uuid

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from stagediff.plan import make_plan
from stagediff.request import DEFAULT_STORE, Request
from tasks import decode_task, denoise_task, encode_task, write_manifest_task


def default_run_name(request: Request) -> str:
    return f"{request.model.rstrip('/').rsplit('/', 1)[-1]}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


@flow(name="generate", task_runner=ThreadPoolTaskRunner(max_workers=3), log_prints=True)
def generate(
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
    dtype: str = "float32",
    store: str = DEFAULT_STORE,
    backend: str = "auto",
    batch_size: int = 1,
    run_name: str | None = None,
    manifest: str | None = None,
) -> str:
    """Generate every prompt with every seed; returns the URI of the run's manifest."""
    request = Request(
        model=model, prompts=prompts, seeds=seeds, negative_prompt=negative_prompt, steps=steps,
        guidance=guidance, height=height, width=width, frames=frames, fps=fps, dtype=dtype, store=store,
        backend=backend, batch_size=batch_size, extras={"flow_shift": flow_shift, "true_cfg": true_cfg},
    )
    plan = make_plan(request)
    plan.store.check_writable()
    params = request.to_dict()
    media = []
    for prompt in dict.fromkeys(request.prompts):
        encoded = encode_task.submit(params, prompts=[prompt])
        denoised = denoise_task.submit(params, prompts=[prompt], wait_for=[encoded])
        media.append(decode_task.submit(params, prompts=[prompt], wait_for=[denoised]))
    for future in media:
        future.result()
    return write_manifest_task(params, run_name or default_run_name(request), manifest)
