"""Section 6 (`--gpu-only`): real-size architectures in bf16 on the GPU, stagediff against the diffusers
pipeline."""

from __future__ import annotations

from common import Case, side_by_side

# Real-size architectures (random weights, bf16) on a GPU, with the anchors from the issue and the
# reference systems' READMEs.
GPU = {
    "sdxl": Case("sdxl", "full", 25, 1024, 1024, anchor="TPU v6e-8 reference (torchax): UNet 25 steps ≈ 2.2 s "
                 "(0.09 s/step), VAE decode ≈ 0.5 s"),
    "flux1": Case("flux1", "full", 28, 1024, 1024, anchor="published: FLUX.1-dev 1024², 28 steps ≈ 4.3 s on one "
                  "H100 with torch.compile"),
    "wan": Case("wan", "full", 50, 480, 832, 81, anchor="TPU v6e-8 reference: Wan 2.1 14B (10× the parameters) "
                "480p 81 frames ≈ 1.26-1.37 s/step"),
}


def gpu(families: list[str]) -> dict:
    """Each family's row, on the CUDA device; skipped without one."""
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device on this machine"}
    return {"device": torch.cuda.get_device_name(), "rows": [gpu_row(family, GPU[family]) for family in families]}


def gpu_row(family: str, case: Case, seeds: int = 2, dtype: str = "bfloat16") -> dict:
    """One prompt × `seeds` seeds both ways; the last item (warm) gives seconds per step and per image.
    stagediff's item is its accelerator time (denoise + decode); its encode runs once per prompt on the
    CPU (the encode workers' side), reported apart, while diffusers encodes on the GPU in every call."""
    plain, staged, max_diff = side_by_side(f"gpu-{family}", case, 1, seeds, dtype)
    stages = staged["stages"]
    ours_per_item = sum(stages[name]["item_seconds"][-1] for name in ("denoise", "decode"))
    return {
        "family": family, "model": case.label(dtype), "steps": case.steps, "size": case.size,
        "diffusers_s_per_step": plain["step_seconds"][-1],
        "stagediff_s_per_step": stages["denoise"]["item_seconds"][-1] / case.steps,
        "diffusers_s_per_item": plain["item_seconds"][-1], "stagediff_s_per_item": ours_per_item,
        "stagediff_cpu_encode_s_per_prompt": stages["encode"]["item_seconds"][0],
        "ratio": plain["item_seconds"][-1] / ours_per_item, "max_pixel_diff": max_diff, "anchor": case.anchor,
    }


def markdown(section: dict) -> list[str]:
    lines = ["## 6. GPU: real-size architectures, random weights", ""]
    if "rows" not in section:
        return lines + [f"Skipped: {section.get('skipped', 'not run')}."]
    lines += [f"On {section['device']}; the last of each run's items (warm). stagediff's item is its GPU time "
              "(denoise + decode); it encodes once per prompt on the CPU, apart.", "",
              "| family | model | steps | size | diffusers s/step | stagediff s/step | diffusers s/item "
              "| stagediff s/item | ratio | stagediff CPU encode s/prompt | max pixel diff | anchor |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in section["rows"]:
        lines.append(f"| {row['family']} | {row['model']} | {row['steps']} | {row['size']} | "
                     f"{row['diffusers_s_per_step']:.3f} | {row['stagediff_s_per_step']:.3f} | "
                     f"{row['diffusers_s_per_item']:.2f} | {row['stagediff_s_per_item']:.2f} | {row['ratio']:.2f}× | "
                     f"{row['stagediff_cpu_encode_s_per_prompt']:.2f} | {row['max_pixel_diff']} | {row['anchor']} |")
    return lines
