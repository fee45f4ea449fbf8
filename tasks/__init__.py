"""Prefect tasks, one per stage: thin wrappers around `stagediff.stages.run_stage`."""

from tasks.stage_tasks import STAGE_TASKS, decode_task, denoise_task, encode_task, score_task

__all__ = ["STAGE_TASKS", "encode_task", "denoise_task", "decode_task", "score_task"]
