"""The scheduler (`stagediff.scheduler`): which units a batch becomes, in what order, and how the
CLI's in-process runs follow the overlap policy. Units on real workers are in test_prefect_warm.py."""

from __future__ import annotations

import dataclasses

from stagediff.inventory import DONE, plan_state
from stagediff.plan import DECODE, DENOISE, ENCODE, make_plan
from stagediff.request import Request
from stagediff.scheduler import LocalExecutor, schedule, unit_items


def request(model, store, **options):
    return Request(**{"model": str(model), "prompts": ["a red fox"], "seeds": list(range(24)), "steps": 2,
                      "height": 64, "width": 64, "store": str(store), **options})


def by_stage(units):
    return {stage: [unit for unit in units if unit.stage == stage] for stage in (ENCODE, DENOISE, DECODE)}


def test_units_come_from_the_accelerators_and_a_cap_never_from_the_prompts():
    assert unit_items(items=24, accelerators=1) == 12  # two runs per accelerator
    assert unit_items(items=24, accelerators=2) == 6
    assert unit_items(items=1000, accelerators=1) == 32  # the cap
    assert unit_items(items=3, accelerators=0) == 2  # no worker yet: as for one


def test_one_prompt_over_24_seeds_fans_out_over_two_accelerators(tiny_sdxl, tmp_path):
    plan = make_plan(request(tiny_sdxl, tmp_path))
    units = by_stage(schedule(plan, plan_state(plan), accelerators=2))

    (encode,) = units[ENCODE]  # the prompt is encoded once, for every seed
    assert len(units[DENOISE]) == len(units[DECODE]) == 4
    assert [len(unit.keys) for unit in units[DENOISE]] == [6, 6, 6, 6]
    assert all(unit.after == (encode.index,) for unit in units[DENOISE])
    assert [unit.after for unit in units[DECODE]] == [(unit.index,) for unit in units[DENOISE]]
    assert sorted(key for unit in units[DENOISE] for key in unit.keys) == sorted(i.latents_key for i in plan.items)
    assert sum(unit.items for unit in units[DECODE]) == 24


def test_a_unit_narrows_the_request_to_its_own_prompts_and_seeds(tiny_sdxl, tmp_path):
    plan = make_plan(request(tiny_sdxl, tmp_path, prompts=["a red fox", {"prompt": "a cat", "negative_prompt": "dog"}],
                             seeds=[0, 1]))
    units = schedule(plan, plan_state(plan), accelerators=2)
    denoise = [unit for unit in units if unit.stage == DENOISE][-1]
    narrowed = make_plan(denoise.request(plan.request))
    assert {item.latents_key for item in narrowed.items} == set(denoise.keys)
    assert denoise.request(plan.request).prompts == ({"prompt": "a cat", "negative_prompt": "dog"},)


def test_only_what_the_store_lacks_is_scheduled(tiny_sdxl, tmp_path):
    plan = make_plan(request(tiny_sdxl, tmp_path, seeds=[0, 1, 2, 3]))
    state = plan_state(plan)
    first, second, *rest = plan.items
    media = {**state.media, first.media_path: DONE}
    latents = {**state.latents, first.latents_path: DONE, second.latents_path: DONE}
    units = by_stage(schedule(plan, dataclasses.replace(state, media=media, latents=latents), accelerators=1, size=4))

    assert [set(unit.keys) for unit in units[DENOISE]] == [{item.latents_key for item in rest}]
    assert [set(unit.keys) for unit in units[DECODE]] == [{item.latents_key for item in (second, *rest)}]
    done = dataclasses.replace(state, media=dict.fromkeys(state.media, DONE))
    assert schedule(plan, done, accelerators=1) == []


def test_a_grid_is_scheduled_point_by_point(tiny_sdxl, tmp_path):
    plan = make_plan(request(tiny_sdxl, tmp_path, prompts=["a red fox", "a cat"], seeds=[0, 1], steps=[1, 2]))
    units = schedule(plan, plan_state(plan), accelerators=2, size=4)
    points = [{item.point for item in plan.items if item.latents_key in unit.keys}
              for unit in units if unit.stage == DENOISE]
    assert [len(point) for point in points] == [1, 1] and points[0] != points[1]


def test_in_process_units_run_one_at_a_time_on_a_cpu_and_overlap_with_an_accelerator():
    alone = LocalExecutor(lambda unit: None, overlap=False)
    assert {alone.lane(stage) for stage in (ENCODE, DENOISE, DECODE)} == {"this process"}
    beside = LocalExecutor(lambda unit: None, overlap=True)
    assert beside.lane(ENCODE) != beside.lane(DENOISE) == beside.lane(DECODE)
    for executor in (alone, beside):
        executor.close()
