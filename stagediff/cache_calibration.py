"""`stagediff calibrate-cache`: MagCache's magnitude ratios for a model that diffusers ships none for.

MagCache skips steps while the product of the per-step ratios ‖residualₜ‖ / ‖residualₜ₋₁‖ of the
transformer stays near 1; the ratios belong to the model. Calibration runs the plan's items through the
denoise loop with MagCache in diffusers' calibration mode (which never skips), averages the ratios of every
call (an item's cond and uncond passes alike: with Wan's paired passes the hook already sees their mean) and
stores them in the store under the denoiser's fingerprint, where `--cache magcache` finds them.
"""

from __future__ import annotations

from stagediff import __version__, stages
from stagediff.errors import StagediffError
from stagediff.plan import Plan
from stagediff.cache_spec import calibration_path
from stagediff.step_cache import MagCacheCalibration, captured_calibration


def calibrate_magcache(plan: Plan) -> tuple[str, list[float]]:
    """Calibrate MagCache on the plan's items (encoding their prompts first if needed); return the
    calibration's store URI and the ratios, one per step."""
    family = plan.family
    if not family.step_cache_hooks:
        raise StagediffError(f"calibrate-cache: {family.name} models have no step-cache hooks in diffusers")
    if len(plan.points) > 1:
        raise StagediffError("calibrate-cache calibrates one setting: give one value of each grid option")
    stages.encode(plan)
    settings = plan.points[0].settings.replace(cache=MagCacheCalibration())
    calls = []
    for item in plan.items:
        with captured_calibration() as reported:
            stages.denoise_in_memory(plan, [item], settings)
        calls.extend(reported)
    if not calls or any(len(ratios) != settings.steps for ratios in calls):
        raise RuntimeError(f"MagCache's calibration reported {len(calls)} calls, not one ratio per step each")
    ratios = [sum(values) / len(calls) for values in zip(*calls)]
    document = {
        "method": "magcache",
        "ratios": ratios,
        "model": plan.request.model,
        "family": family.name,
        "denoiser": plan.model.fingerprint(family.denoise_components),
        "steps": settings.steps,
        "guidance": settings.guidance,
        "items": [{"prompt": item.prompt, "seed": item.seed} for item in plan.items],
        "calls": len(calls),
        "stagediff_version": __version__,
    }
    return plan.store.write_json(calibration_path(plan.model), document), ratios
