"""What a store holds for a plan, judged from one listing per folder and from artifact headers, never
from a body: which stages still have work, how far a run got, what `stagediff status` reports. On an
object store the listing carries each upload's summary (key, checksum, size), so deciding costs a few
paged listing requests for thousands of items; on a local disk it costs one small header read per
artifact. The stages ask it too whether their artifacts are done (one judge, never a body read).
Bodies are verified in full where they are consumed (and by `stagediff verify`); a version that a
consumer found corrupt (its note, `<artifact>.corrupt`) counts as corrupt."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from stagediff.errors import CorruptArtifact
from stagediff.manifest import artifact_path
from stagediff.plan import DECODE, DENOISE, ENCODE, Plan
from stagediff.store import CORRUPT_MARKER_SUFFIX, Listed, Store, quarantined_version

DONE, MISSING, CORRUPT, STALE = "done", "missing", "corrupt", "stale"
"""Artifact states: complete; absent; truncated, foreign or under another key; media decoded from other
latents than the store holds now."""


class Inventory:
    """The state of a store's artifacts, each folder listed once."""

    def __init__(self, store: Store):
        self.store = store
        self._folders: dict[str, dict[str, Listed]] = {}

    def tensors(self, relative: str, key: str) -> tuple[str, str | None]:
        """(state, checksum) of a safetensors artifact that should hold `key`."""
        listed = self._listed(relative)
        if listed is None:
            return MISSING, None
        if self._marked_corrupt(relative, listed):
            return CORRUPT, None
        try:
            recorded = self.store.recorded(relative, listed)
        except CorruptArtifact:
            return CORRUPT, None
        if recorded.get("key") == key and recorded.get("checksum"):
            return DONE, recorded["checksum"]
        return CORRUPT, None

    def media(self, relative: str, latents_checksum: str | None) -> str:
        """The state of a media file that should be decoded from latents with `latents_checksum` (None:
        those latents are not in the store, so the media file cannot be current)."""
        listed = self._listed(relative)
        if listed is None:
            return MISSING
        if self._marked_corrupt(relative, listed):
            return CORRUPT
        try:
            recorded = self.store.recorded(relative, listed).get("latents-checksum")
        except CorruptArtifact:
            return CORRUPT
        if recorded is None:
            return CORRUPT
        return DONE if recorded == latents_checksum else STALE

    def noted_corrupt(self, paths) -> list[str]:
        """Those of `paths` whose present version a consuming stage found corrupt (`Store.mark_corrupt`)."""
        noted = []
        for path in paths:
            listed = self._listed(path)
            if listed is not None and self._marked_corrupt(path, listed):
                noted.append(path)
        return noted

    def _marked_corrupt(self, relative: str, listed: Listed) -> bool:
        """Whether the stage that consumed this very version of the artifact found its body corrupt."""
        marker = self._listed(relative + CORRUPT_MARKER_SUFFIX)
        if marker is None:
            return False
        try:
            return quarantined_version(self.store, relative) == listed.version
        except FileNotFoundError:
            return False

    def _listed(self, relative: str) -> Listed | None:
        folder, name = relative.rsplit("/", 1)
        if folder not in self._folders:
            self._folders[folder] = self.store.list_folder(folder)
        return self._folders[folder].get(name)


@dataclass(frozen=True)
class PlanState:
    """Per stage, the state of each of a plan's artifacts."""

    embeddings: dict[str, str]
    """Embeddings path → state."""
    latents: dict[str, str]
    """Latents path → state."""
    media: dict[str, str]
    """Media path → state."""

    def counts(self) -> dict[str, Counter]:
        return {ENCODE: Counter(self.embeddings.values()), DENOISE: Counter(self.latents.values()),
                DECODE: Counter(self.media.values())}

    @property
    def missing_stages(self) -> list[str]:
        """The stages to run, in order. Denoise comes with encode, which verifies the embeddings it is about
        to feed in full (a body can be damaged where its header is not); decode alone when only media
        are missing."""
        if any(state != DONE for state in self.latents.values()):
            return [ENCODE, DENOISE, DECODE]
        if any(state != DONE for state in self.media.values()):
            return [DECODE]
        return []

    @property
    def done_items(self) -> int:
        return sum(state == DONE for state in self.media.values())


def plan_state(plan: Plan, inventory: Inventory | None = None) -> PlanState:
    """The state of every artifact of a plan, from listings and headers."""
    return artifact_states(
        inventory or Inventory(plan.store), [(e.path, e.key) for e in plan.embeddings],
        [(item.latents_path, item.latents_key, item.media_path) for item in plan.items],
    )


def manifest_state(store: Store, manifest: dict) -> PlanState:
    """The state of every artifact a run's manifest names (keys are the artifacts' file names)."""

    def path_and_key(uri: str) -> tuple[str, str]:
        path = artifact_path(uri)
        return path, path.rsplit("/", 1)[-1].split(".", 1)[0]

    items = manifest["items"]
    embeddings = list(dict.fromkeys(path_and_key(item["embeddings"]) for item in items))
    return artifact_states(Inventory(store), embeddings,
                           [(*path_and_key(item["latents"]), artifact_path(item["media"])) for item in items])


def artifact_states(inventory: Inventory, embeddings: list[tuple[str, str]],
                    items: list[tuple[str, str, str]]) -> PlanState:
    """States of embeddings (path, key) and items (latents path, latents key, media path)."""
    latents, media = {}, {}
    for latents_path, latents_key, media_path in items:
        latents[latents_path], checksum = inventory.tensors(latents_path, latents_key)
        media[media_path] = inventory.media(media_path, checksum)
    return PlanState({path: inventory.tensors(path, key)[0] for path, key in embeddings}, latents, media)
