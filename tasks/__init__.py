"""Prefect tasks, one per stage: thin wrappers around stagediff.stages."""

from tasks.stage_tasks import decode_task, denoise_task, encode_task, write_manifest_task

__all__ = ["encode_task", "denoise_task", "decode_task", "write_manifest_task"]
