"""The generation options, defined once. The command line's long options (`--negative-prompt`,
repeatable `--prompt`), the Prefect flows' parameters (`negative_prompt`, `prompts`) and the
Request's fields all come from these tables; defaults are the Request's own."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from stagediff.prompts import expand_seeds, read_prompt_file
from stagediff.request import AUTO, BACKENDS, DTYPES, Request

REQUIRED = dataclasses.MISSING
FROM_REQUEST = object()
"""The default of options that are Request fields: the Request's own."""


@dataclass(frozen=True)
class Option:
    """One option: `name` is the flow parameter and the Request field (snake_case; plural for lists),
    `value_type` the type of one value."""

    name: str
    value_type: type
    help: str
    repeated: bool = False
    """A list: the command-line flag is the singular and repeats (`--seed 0 --seed 1` → `seeds`)."""
    choices: tuple[str, ...] = ()
    family_option: bool = False
    """An option of some model families only: it travels in `Request.extras`."""
    default: Any = FROM_REQUEST
    """Options that are Request fields default to the Request's default, others to None."""
    parameter_type: Any = None
    """The type of one value as a flow parameter, where it is more than `value_type` (a seed range is a
    string, a prompt may be an object with its own negative prompt)."""
    extra_flags: tuple[str, ...] = ()
    """More command-line flags for the same option (`--seeds 0-999` beside `--seed 5`)."""
    grid: bool = False
    """One value or several: the flag repeats (`--guidance 3 --guidance 5`), the flow parameter takes a
    number or a list, and a run renders every value."""

    @property
    def flags(self) -> tuple[str, ...]:
        return ("--" + (self.name.removesuffix("s") if self.repeated else self.name).replace("_", "-"), *self.extra_flags)

    @property
    def required(self) -> bool:
        return self.default_value is REQUIRED

    @property
    def default_value(self):
        if self.default is not FROM_REQUEST:
            return self.default
        request_field = _REQUEST_FIELDS.get(self.name)
        return None if request_field is None or self.family_option else request_field.default

    @property
    def annotation(self):
        """The flow parameter's type, as Prefect validates it and shows it in the UI."""
        one = Literal[self.choices] if self.choices else self.parameter_type or self.value_type
        if self.repeated:
            return list[one] if self.default_value is not None else list[one] | None
        if self.grid:
            return one | list[one] | None
        return one if self.required or self.default_value is not None else one | None


def batch_size(text: str) -> int | str:
    """`--batch-size` on the command line: `auto` or a number (its range is the Request's to check)."""
    if text == AUTO:
        return AUTO
    return int(text)  # argparse reports a ValueError as one line naming the bad value


_REQUEST_FIELDS = {field.name: field for field in dataclasses.fields(Request)}

GENERATION_OPTIONS: tuple[Option, ...] = (
    Option("model", str, "Hugging Face id, local diffusers folder or gs:// folder"),
    Option("prompts", str, "a prompt (repeat for several)", repeated=True, default=(),
           parameter_type=str | dict[str, str]),
    Option("prompt_file", str, "a local or gs:// file of prompts: one per line, or .jsonl lines "
           '{"prompt": ..., "negative_prompt": ...}'),
    Option("seeds", str, "a seed, or an inclusive range of seeds such as 0-999 (repeat for several)",
           repeated=True, parameter_type=int | str, extra_flags=("--seeds",)),
    Option("negative_prompt", str, "negative prompt (default: the pipeline's own)"),
    Option("steps", int, "denoising steps (default: the family's); repeat for a grid", grid=True),
    Option("guidance", float, "guidance scale: CFG or embedded, as the family uses it; repeat for a grid",
           grid=True),
    Option("height", int, "pixels, a multiple of the VAE factor"),
    Option("width", int, "pixels, a multiple of the VAE factor"),
    Option("frames", int, "video frames (video families)"),
    Option("fps", int, "video frames per second (video families)"),
    Option("flow_shift", float, "flow-matching shift (Wan: 3.0 for 480p, 5.0 for 720p); repeat for a grid",
           family_option=True, grid=True),
    Option("true_cfg", float, "FLUX.1: true CFG scale, used with a negative prompt (default 1: off)",
           family_option=True),
    Option("cache", str, "step caching for flux1, flux2, flux2-klein, wan: none (exact), fbcache[:THRESHOLD], "
           "magcache[:THRESHOLD], taylorseer[:INTERVAL] or taylorseer-attention[:INTERVAL]; more parameters as "
           ",NAME=VALUE"),
    Option("loras", str, "a LoRA, SOURCE[:SCALE] (scale 1 by default): a .safetensors file, a gs:// file, a Hugging "
           "Face id org/name or hf://org/name/FILE.safetensors; repeat for several LoRAs, and repeat a source with "
           "other scales for a grid over them", repeated=True, default=(), parameter_type=str | dict[str, str | float]),
    Option("dtype", str, "weights and activations dtype", choices=DTYPES),
    Option("store", str, "artifact store: a local folder or gs://bucket/prefix"),
    Option("backend", str, "where denoise and decode run: torchax on TPU by default, torch elsewhere",
           choices=BACKENDS),
    Option("batch_size", batch_size, "items denoised and decoded per call, or auto: as many of one shape as the "
           "stage's device memory holds, up to a cap", parameter_type=int | Literal["auto"]),
    Option("mesh", str, "torchax device mesh, e.g. tp=8 or dp=2,tp=4 (axes dp, fsdp, tp)"),
    Option("scores", str, "score every finished item after decode: clip or clip:MODEL (CLIP score; MODEL a Hugging "
           "Face id, local or gs:// folder, default openai/clip-vit-large-patch14); repeat for several scorers",
           repeated=True, default=()),
    Option("vae_tiling", bool, "decode in overlapping tiles (without it: only when one piece would not fit "
           "the device's memory)"),
)
"""What to generate: every option of a Request."""

RUN_OPTIONS: tuple[Option, ...] = (
    Option("run_name", str, "name of the run folder under runs/ in the store"),
    Option("manifest", str, "also write the run manifest here"),
)
"""How a whole run is recorded."""


def option_named(options: tuple[Option, ...], name: str) -> Option:
    return next(option for option in options if option.name == name)


def request_from_options(values: Mapping[str, Any]) -> Request:
    """The validated Request behind option values (CLI arguments or flow parameters, by name; other
    names are ignored): the prompt file's prompts after the prompts, seed ranges expanded."""
    fields = {o.name: values[o.name] for o in GENERATION_OPTIONS
              if o.name in values and o.name in _REQUEST_FIELDS and not o.family_option}
    prompt_file = values.get("prompt_file")
    fields["prompts"] = [*(values.get("prompts") or ()), *(read_prompt_file(prompt_file) if prompt_file else ())]
    fields["seeds"] = expand_seeds(values.get("seeds") or ())
    fields["loras"] = values.get("loras") or ()
    fields["scores"] = values.get("scores") or ()
    extras = {o.name: values.get(o.name) for o in GENERATION_OPTIONS if o.family_option}
    return Request(**fields, extras=extras)
