"""Scores of generated media (light core: no torch). `--score clip[:MODEL]` names a scorer; a scorer's
identity is the content of its files, and each (media file, scorer) has one score file,
`scores/<metric>/<key>.json`, keyed by the media key and that identity: a rerun scores nothing twice,
a new scorer (or a changed file of one) scores everything once. The manifest carries each item's scores
and a summary per grid point (mean, standard deviation, worst prompts)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from stagediff.errors import CorruptArtifact, StagediffError, one_line
from stagediff.fingerprints import IGNORED_WEIGHTS, file_digest, is_ignored_weight
from stagediff.hub import hub_unreachable
from stagediff.loras import lora_name
from stagediff.models import looks_like_hub_id, split_hub_reference
from stagediff.store import Store, content_key

SCORE = "score"
SCORES_FOLDER = "scores"
SCORE_FILES = "score_files"
"""The manifest item field naming its score files (scorer name → URI), beside `scores` (their values)."""
METRICS = ("clip",)
DEFAULT_MODELS = {"clip": "openai/clip-vit-large-patch14"}
VIDEO_FRAMES = 8
"""Frames of a video scored (sampled evenly, first and last included); its score is their mean."""
SCORE_VERSION = 1
"""Part of every score key: a change of how a metric is computed gives every score a new key."""
WORST_PROMPTS = 3
"""Prompts a summary names as the worst of a grid point (lowest mean score)."""
SCORER_PATTERNS = ("*.json", "*.txt", "*.safetensors", "*.model")
"""The files of a Hub scorer that are downloaded (configs, tokenizer, safetensors weights)."""


@dataclass(frozen=True)
class ScorerSpec:
    """What `--score` names: a metric and the model that computes it."""

    metric: str
    model: str

    @property
    def name(self) -> str:
        """How manifests and summaries name the scorer: the metric, or `metric:model` for another model
        (a Hub model by its id: the commit it was pinned to is not part of its name)."""
        model = _without_revision(self.model)
        return self.metric if model == DEFAULT_MODELS[self.metric] else f"{self.metric}:{model}"


def _without_revision(model: str) -> str:
    repo_id, revision = split_hub_reference(model)
    return repo_id if revision and looks_like_hub_id(repo_id) else model


def parse_score(text: str) -> ScorerSpec:
    """`clip` or `clip:MODEL` (a Hugging Face id, a local folder or a gs:// folder)."""
    if not isinstance(text, str) or not text.strip():
        raise StagediffError(f"--score {text!r}: name a scorer, e.g. clip or clip:MODEL")
    metric, _, model = text.strip().partition(":")
    if metric not in METRICS:
        raise StagediffError(f"--score {text!r}: unknown scorer {metric!r} (choose from {', '.join(METRICS)})")
    if _ and not model:
        raise StagediffError(f"--score {text!r}: no model after the colon")
    return ScorerSpec(metric, model or DEFAULT_MODELS[metric])


def check_scores(values: Iterable[str]) -> None:
    """A one-line error for a bad or repeated `--score`."""
    names = [parse_score(value).name for value in values]
    repeated = next((name for name in names if names.count(name) > 1), None)
    if repeated:
        raise StagediffError(f"--score {repeated!r} is given twice")


@dataclass(frozen=True)
class Scorer:
    """A scorer resolved to local files, with its identity."""

    spec: ScorerSpec
    folder: Path
    identity: str
    """The digest of every file it loads (weights in formats never loaded aside)."""
    revision: str | None = None
    """The commit a Hub scorer resolved to (None for a folder)."""

    @property
    def pinned(self) -> str:
        """The `--score` that names exactly this scorer: a Hub model at its commit (`clip:org/name@<commit>`),
        so that every unit of a run, in any process, loads that commit."""
        if self.revision is None:
            return f"{self.spec.metric}:{self.spec.model}"
        return f"{self.spec.metric}:{split_hub_reference(self.spec.model)[0]}@{self.revision}"

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def metric(self) -> str:
        return self.spec.metric


def open_scorer(spec: ScorerSpec) -> Scorer:
    """The scorer's files made local (a gs:// folder mirrored, a Hub model's configs, tokenizer and
    safetensors weights downloaded) and its identity."""
    from stagediff.confinement import check_location

    reference, revision = spec.model, None
    if reference.startswith("gs://") or Path(reference).expanduser().exists():
        check_location("--score", reference)
    if reference.startswith("gs://"):
        from stagediff.gcs import mirror_folder

        folder = mirror_folder(reference).folder
    else:
        path = Path(reference).expanduser()
        if path.is_dir():
            folder = path.resolve()
        elif path.exists() or reference.startswith((".", "/", "~")) or reference.count("/") != 1:
            raise StagediffError(f"--score {spec.metric}:{reference}: no such model folder")
        else:
            folder = _hub_folder(spec)
            revision = folder.name  # a snapshot's folder is named by its commit
    if not (folder / "config.json").is_file():
        raise StagediffError(f"--score {spec.metric}:{reference}: not a transformers model folder (no config.json)")
    return Scorer(spec, folder, scorer_identity(folder), revision)


def _hub_folder(spec: ScorerSpec) -> Path:
    """The Hub snapshot of the scorer (`org/name`, or `org/name@revision`) with the files it loads."""
    from huggingface_hub import snapshot_download

    repo_id, revision = split_hub_reference(spec.model)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(SCORER_PATTERNS),
                                      ignore_patterns=list(IGNORED_WEIGHTS)))
    except Exception as error:
        if hub_unreachable(error):
            raise StagediffError(f"--score {spec.metric}:{spec.model}: the Hugging Face Hub cannot be reached or "
                                 f"refuses requests now ({one_line(error)}); try again later") from None
        raise StagediffError(f"--score {spec.metric}:{spec.model}: model not found (no such folder; Hugging Face "
                             f"download failed: {one_line(error)})") from None


def scorer_identity(folder: Path) -> str:
    """The content identity of a scorer folder: every file's digest (see `fingerprints.file_digest`)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if not is_ignored_weight(path):
            digest.update(f"{path.relative_to(folder)}\0{file_digest(path)}\n".encode())
    return digest.hexdigest()[:32]


def open_scorers(values: Sequence[str]) -> tuple[Scorer, ...]:
    check_scores(values)
    return tuple(open_scorer(parse_score(value)) for value in values)


# -- what to score --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScoreTask:
    """One (item, scorer): its key and its score file."""

    item: object
    """The plan's `Item`."""
    scorer: Scorer
    key: str
    inputs: dict
    path: str


def score_task(item, scorer: Scorer) -> ScoreTask:
    inputs = {"media": item.media_key, "metric": scorer.metric, "scorer": scorer.identity, "version": SCORE_VERSION}
    if item.media_path.endswith(".mp4"):
        inputs["frames"] = VIDEO_FRAMES
    key = content_key(inputs)
    return ScoreTask(item, scorer, key, inputs, f"{SCORES_FOLDER}/{scorer.metric}/{key}.json")


def score_tasks(plan) -> list[ScoreTask]:
    """Every (item, scorer) of the plan, items first."""
    return [score_task(item, scorer) for item in plan.items for scorer in plan.scorers]


def stored_scores(plan) -> set[str]:
    """The score files the store holds among the plan's, from one listing per metric."""
    store, found = plan.store, set()
    for metric in {scorer.metric for scorer in plan.scorers}:
        found.update(f"{SCORES_FOLDER}/{metric}/{name}" for name in store.list_folder(f"{SCORES_FOLDER}/{metric}"))
    return found


def read_score(store: Store, task: ScoreTask, latents_checksum: str | None = None) -> float | None:
    """The stored score of a task; None when missing, not a score file of its key, or (given the checksum
    of the latents the media is now decoded from) a score of media decoded from other latents: stale."""
    try:
        record = json.loads(store.read_bytes(task.path))
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != task.key:
        return None
    if latents_checksum is not None and record.get("latents_checksum") != latents_checksum:
        return None
    value = record.get("score")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def check_score_file(data: bytes, key: str) -> None:
    """CorruptArtifact unless `data` is a score file of `key`: a JSON object with that key and a finite score."""
    try:
        record = json.loads(data)
    except ValueError as error:
        raise CorruptArtifact(f"score file {key}: not JSON ({one_line(error)})") from None
    if not isinstance(record, dict) or record.get("key") != key:
        raise CorruptArtifact(f"score file {key}: not the score of its key")
    value = record.get("score")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CorruptArtifact(f"score file {key}: score {value!r} is not a finite number")


def score_record(task: ScoreTask, value: float, media_uri: str, latents_checksum: str | None) -> dict:
    """What a score file holds: the score, its key and key inputs, what was scored, and the checksum of
    the latents that media was decoded from (a media file decoded again from other latents makes it stale)."""
    from stagediff import __version__

    return {"score": float(value), "key": task.key, "inputs": task.inputs, "scorer": task.scorer.name,
            "prompt": task.item.prompt, "media": media_uri, "latents_checksum": latents_checksum,
            "stagediff_version": __version__}


# -- results ----------------------------------------------------------------------------------------
def attach_scores(plan, document: dict) -> None:
    """Add to a manifest document each item's scores (None where not scored) and, per scorer, its
    identity and the summary per grid point."""
    if not plan.request.scores:
        return
    store = plan.store
    by_item: dict[int, dict] = {}
    files_by_item: dict[int, dict] = {}
    for task in score_tasks(plan):
        by_item.setdefault(id(task.item), {})[task.scorer.name] = read_score(store, task)
        files_by_item.setdefault(id(task.item), {})[task.scorer.name] = store.uri_of(task.path)
    for entry, item in zip(document["items"], plan.items):
        entry["scores"] = by_item.get(id(item), {})
        entry[SCORE_FILES] = files_by_item.get(id(item), {})
    document["scorers"] = {scorer.name: {"model": scorer.spec.model, "identity": scorer.identity}
                           for scorer in plan.scorers}
    document["score_summary"] = summarize(document)


def swept_values(manifest: dict, item: dict) -> dict:
    """The item's values of what the run sweeps (its grid's settings, LoRA scales by LoRA name)."""
    values = {name: item.get("settings", {}).get(name) for name in manifest.get("grid", {})}
    loras = [lora for lora in manifest.get("loras", ()) if len(lora.get("scales", ())) > 1]
    scales = {entry["source"]: entry["scale"] for entry in item.get("loras", ())}
    values.update({lora_name(lora["source"]): scales.get(lora["source"]) for lora in loras})
    return values


def point_label(values: dict) -> str:
    """`guidance 3 · steps 20`, or `all` for a run without a grid."""
    return " · ".join(f"{name} {_number(value)}" for name, value in values.items()) or "all"


def summarize(manifest: dict) -> dict[str, list[dict]]:
    """Per scorer, per grid point (in order): the values swept, count, mean, standard deviation (population)
    and the worst prompts (lowest mean over their seeds)."""
    summary: dict[str, list[dict]] = {}
    names = list(dict.fromkeys(name for item in manifest["items"] for name in item.get("scores") or {}))
    for name in names:
        points: dict[str, dict] = {}
        for item in manifest["items"]:
            value = (item.get("scores") or {}).get(name)
            values = swept_values(manifest, item)
            point = points.setdefault(json.dumps(values, sort_keys=True), {"values": values, "scores": [], "prompts": {}})
            if value is not None:
                point["scores"].append(value)
                point["prompts"].setdefault(item["prompt"], []).append(value)
        summary[name] = [_point_summary(point) for point in points.values()]
    return summary


def _point_summary(point: dict) -> dict:
    scores = point["scores"]
    mean = sum(scores) / len(scores) if scores else None
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores)) if scores else None
    by_prompt = sorted(((sum(v) / len(v), prompt) for prompt, v in point["prompts"].items()))
    return {"values": point["values"], "label": point_label(point["values"]), "count": len(scores), "mean": mean,
            "std": std, "worst": [{"prompt": prompt, "score": value} for value, prompt in by_prompt[:WORST_PROMPTS]]}


def summary_rows(manifest: dict) -> list[dict]:
    """The summary as table rows (the Prefect table artifact, the CLI)."""
    rows = []
    for name, points in (manifest.get("score_summary") or {}).items():
        for point in points:
            rows.append({"scorer": name, "point": point["label"], "count": point["count"],
                         "mean": _rounded(point["mean"]), "std": _rounded(point["std"]),
                         "worst prompts": "; ".join(f"{w['prompt']} ({w['score']:.2f})" for w in point["worst"])})
    return rows


def run_score(manifest: dict, scorer: str | None = None) -> float | None:
    """One number for a run: the mean of a scorer's item scores (the first scorer by default)."""
    names = list(manifest.get("score_summary") or summarize(manifest))
    if not names:
        return None
    name = scorer or names[0]
    values = [item["scores"][name] for item in manifest["items"] if (item.get("scores") or {}).get(name) is not None]
    return sum(values) / len(values) if values else None


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
