"""LoRA adapters: where a `--lora` file comes from, which pipeline components it changes, and fusing it into
a stage's pipeline.

A source is a local `.safetensors` file, a `gs://` object (mirrored into the model cache like `gs://`
models), or a file of a Hugging Face repository: `hf://org/name/FILE.safetensors`, or `org/name` alone for
a repository holding one LoRA file. Only safetensors files are read. diffusers' own loader for the model's
pipeline reads the file (`lora_state_dict`, which converts kohya and other common formats), and before
any work every LoRA layer must name a weight of the model's component with fitting shapes, so a LoRA of
another family or model size fails at once, with one line.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stagediff.confinement import check_location
from stagediff.errors import StagediffError, one_line
from stagediff.fingerprints import file_digest
from stagediff.models import Model, looks_like_hub_id

HUB_PREFIX = "hf://"
LORA_SUFFIX = ".safetensors"
HUB_DEFAULT_WEIGHT = "pytorch_lora_weights.safetensors"
"""The file name diffusers' training scripts save a LoRA under."""
LORA_LAYER = re.compile(r"(?P<module>.+)\.lora_(?P<part>[AB])\.weight")
"""A LoRA layer's down (A, `[rank, in, ...]`) or up (B, `[out, rank, ...]`) weight, in peft's naming."""
TEXT_MODEL_PREFIX = "text_model."
"""transformers 5 flattened CLIPTextModel: checkpoints and LoRAs name its weights with or without it."""


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file, local, checked against one model."""

    source: str
    """As the user gave it."""
    path: Path
    digest: str
    """`stagediff.fingerprints.file_digest` of the file: part of the keys of the stages it changes."""
    components: tuple[str, ...]
    """The pipeline components it has weights for (`unet`, `text_encoder`, `transformer`, ...)."""

    @property
    def name(self) -> str:
        return lora_name(self.source)


@dataclass(frozen=True)
class AppliedLora:
    """A LoRA at one scale."""

    file: LoraFile
    scale: float

    def changes(self, components: Sequence[str]) -> bool:
        """True when it has weights for any of `components`."""
        return any(component in components for component in self.file.components)

    def key_entry(self) -> dict:
        return {"lora": self.file.digest, "scale": self.scale}


def lora_name(source: str) -> str:
    """A short label for a LoRA source: its file name without the suffix."""
    return source.rstrip("/").rsplit("/", 1)[-1].removesuffix(LORA_SUFFIX)


_opened: dict[tuple, LoraFile] = {}
_opened_lock = threading.Lock()


def open_lora(source: str, model: Model) -> LoraFile:
    """The LoRA file behind `source`, fetched and checked against `model`; a one-line error for a file that
    is missing, not safetensors, or not a LoRA of this model. Checked once per process for each content of
    the file and of the model's components."""
    path = _local_file(source)
    digest = file_digest(path)
    family = model.family
    loadable = _loadable_components(model)
    identity = (family.name, str(model.folder), str(path), digest, model.fingerprint(loadable))
    with _opened_lock:
        if identity in _opened:
            return _opened[identity]
    components = _components_it_fits(source, path, model, loadable)
    lora = LoraFile(source, path, digest, components)
    with _opened_lock:
        _opened[identity] = lora
    return lora


def fuse_loras(pipe, model: Model, loras: Sequence[AppliedLora], components: Sequence[str]) -> None:
    """Load each LoRA's parts for `components` into the pipeline with diffusers' loaders, fuse them into the
    weights at their scales, and drop the adapter layers: the modules are plain again, so the compiled
    denoiser has no adapter cost. A pipeline with other LoRAs is loaded afresh (exact weights), not unfused."""
    from diffusers import ModelMixin

    names, scales, fused = [], [], set()
    for index, lora in enumerate(loras):
        parts = [component for component in lora.file.components if component in components]
        if not parts:
            continue
        state_dict, alphas, metadata = model.family.lora_state_dict(lora.file.path, model.config_of)
        name = f"stagediff_{index}"
        for component in parts:
            module = getattr(pipe, component)
            if isinstance(module, ModelMixin):
                module.load_lora_adapter(state_dict, prefix=component, network_alphas=alphas, metadata=metadata,
                                         adapter_name=name, _pipeline=pipe)
            else:
                type(pipe).load_lora_into_text_encoder(state_dict, network_alphas=alphas, text_encoder=module,
                                                       prefix=component, adapter_name=name, metadata=metadata,
                                                       _pipeline=pipe)
        names.append(name)
        scales.append(lora.scale)
        fused.update(parts)
    if names:
        pipe.set_adapters(names, adapter_weights=scales)
        pipe.fuse_lora(components=sorted(fused), adapter_names=names)
        pipe.unload_lora_weights()


def _local_file(source: str) -> Path:
    """A local path holding the source's file (fetched from a bucket or the Hub)."""
    if source.startswith("gs://"):
        from stagediff.gcs import mirror_file

        check_location("--lora", source)
        _check_suffix(source, source)
        return mirror_file(source, "--lora")
    local = Path(source).expanduser()
    if source.startswith(HUB_PREFIX) or (not local.exists() and looks_like_hub_id(source)):
        return _hub_file(source)
    check_location("--lora", source)
    _check_suffix(source, source)
    if not local.is_file():
        raise StagediffError(f"--lora {source}: no such file")
    return local.resolve()


def _hub_file(source: str) -> Path:
    from huggingface_hub import HfApi, hf_hub_download

    parts = source.removeprefix(HUB_PREFIX).split("/")
    if len(parts) < 2 or not all(parts):
        raise StagediffError(f"--lora {source}: a Hugging Face LoRA is hf://org/name/FILE.safetensors or org/name")
    repo_id, weight = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        if not weight:
            files = [name for name in HfApi().list_repo_files(repo_id) if "/" not in name and name.endswith(LORA_SUFFIX)]
            if HUB_DEFAULT_WEIGHT not in files and len(files) != 1:
                raise StagediffError(f"--lora {source}: name its file, hf://{repo_id}/FILE.safetensors (it holds "
                                     f"{', '.join(files) or 'no .safetensors file'} at the top)")
            weight = HUB_DEFAULT_WEIGHT if HUB_DEFAULT_WEIGHT in files else files[0]
        _check_suffix(source, weight)
        return Path(hf_hub_download(repo_id, weight))
    except StagediffError:
        raise
    except Exception as error:
        raise StagediffError(f"--lora {source}: Hugging Face download failed: {one_line(error)}") from None


def _check_suffix(source: str, name: str) -> None:
    if not name.endswith(LORA_SUFFIX):
        raise StagediffError(f"--lora {source}: only .safetensors LoRA files are loaded (stagediff never unpickles "
                             "weights)")


def _loadable_components(model: Model) -> tuple[str, ...]:
    # diffusers lists the components its LoRA loader for the pipeline fills; this model may lack some.
    loadable = model.family.pipeline_class()._lora_loadable_modules
    return tuple(component for component in loadable if component in model.components())


def _components_it_fits(source: str, path: Path, model: Model, loadable: tuple[str, ...]) -> tuple[str, ...]:
    family = model.family
    try:
        state_dict, _alphas, _metadata = family.lora_state_dict(path, model.config_of)
    except Exception as error:
        raise StagediffError(f"--lora {source}: not a LoRA file diffusers reads for {family.name} models "
                             f"({one_line(error)})") from None
    parts = {component: {key.removeprefix(f"{component}."): value for key, value in state_dict.items()
                         if key.startswith(f"{component}.")} for component in loadable}
    parts = {component: weights for component, weights in parts.items() if weights}
    if not parts:
        raise StagediffError(f"--lora {source}: none of its weights is for a {family.name} model's "
                             f"{' or '.join(loadable)} (a LoRA for another model family?)")
    for component, weights in parts.items():
        _check_fits(source, model, component, weights)
    return tuple(parts)


def _check_fits(source: str, model: Model, component: str, weights: dict) -> None:
    """Every LoRA layer of `weights` names a weight of the component, with the same input and output sizes."""
    text_encoder = model.library_of(component) == "transformers"
    try:
        layers = _in_peft_naming(weights, text_encoder)
    except Exception as error:
        raise StagediffError(f"--lora {source}: its {component} weights are in no format diffusers reads "
                             f"({one_line(error)})") from None
    shapes = {_unprefixed(name, text_encoder): shape for name, shape in model.weight_shapes(component).items()}
    for key, tensor in layers.items():
        layer = LORA_LAYER.fullmatch(_unprefixed(key, text_encoder))
        if layer is None:
            continue
        module, part = layer["module"], layer["part"]
        base = shapes.get(f"{module}.weight")
        if base is None:
            raise StagediffError(f"--lora {source}: this {model.family.name} model's {component} has no layer "
                                 f"{module!r} (a LoRA for another model?)")
        fits = tensor.shape[1] == base[1] if part == "A" else tensor.shape[0] == base[0]
        if len(base) < 2 or not fits:
            raise StagediffError(f"--lora {source}: layer {component}.{module} has weights {tuple(base)} in this "
                                 f"model, the LoRA's {part} matrix is {tuple(tensor.shape)} (a LoRA for another model?)")


def _in_peft_naming(weights: dict, text_encoder: bool) -> dict:
    """The weights named as peft names them (`<module>.lora_A.weight`), converted as diffusers' loaders do."""
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if text_encoder:
        return convert_state_dict_to_peft(convert_state_dict_to_diffusers(weights))
    return weights if any("lora_A" in key for key in weights) else convert_unet_state_dict_to_peft(weights)


def _unprefixed(name: str, text_encoder: bool) -> str:
    return name.removeprefix(TEXT_MODEL_PREFIX) if text_encoder else name
