"""The rules by which a generate run tells a lost stage run from a waiting or running one, from the
stage workers' heartbeats (`flows.stage_workers`; the end-to-end paths are in test_prefect_warm.py)."""

from __future__ import annotations

import datetime

from flows.stage_workers import IDLE_PROOF_SECONDS, StageRun, proves_lost
from stagediff.scheduler import Unit
from tasks.heartbeats import Heartbeats, IdleReport

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


def at(seconds: float) -> datetime.datetime:
    return T0 + datetime.timedelta(seconds=seconds)


def waiting_denoise(submitted: float) -> StageRun:
    unit = Unit(1, "denoise", ("latents-key",), ("a red cat",), (0,), after=(0,))
    return StageRun(unit, {"prompts": ["a red cat"]}, submitted_at=at(submitted))


def test_a_queued_run_is_lost_once_a_worker_of_its_stage_idled_long_enough_after_it_was_submitted():
    idle_since_before = Heartbeats(idle=[IdleReport(at(IDLE_PROOF_SECONDS + 1), 60, ["decode", "denoise"])])
    assert proves_lost(idle_since_before, waiting_denoise(submitted=0))


def test_a_queued_run_is_not_lost_while_workers_of_its_stage_are_busy_or_just_idle():
    just_submitted = Heartbeats(idle=[IdleReport(at(3), 60, ["decode", "denoise"])])
    briefly_idle = Heartbeats(idle=[IdleReport(at(60), 2, ["decode", "denoise"])])
    other_stage = Heartbeats(idle=[IdleReport(at(60), 60, ["encode"])])
    for heartbeats in (just_submitted, briefly_idle, other_stage, Heartbeats()):
        assert not proves_lost(heartbeats, waiting_denoise(submitted=0))


def test_a_run_counts_as_running_only_for_reports_of_other_workers_after_a_given_time():
    heartbeats = Heartbeats(running={"run-1": [(at(10), "worker-a")]})
    assert heartbeats.reported_running("run-1")
    assert heartbeats.reported_running("run-1", after=at(5), by_other_than="worker-b")
    assert not heartbeats.reported_running("run-1", after=at(5), by_other_than="worker-a")
    assert not heartbeats.reported_running("run-1", after=at(11))
    assert not heartbeats.reported_running("run-2")
