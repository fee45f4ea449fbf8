"""Hugging Face Hub models: a snapshot opened with its configs only, each stage's components fetched
when the stage loads them, and file identities from the Hub's own content hashes.

Opening a model downloads `model_index.json` and the components' JSON files (configs, tokenizer
files), enough to plan a request. The listing of the resolved commit (every file's LFS sha256 or git
blob id, which is also what names the blobs in the local cache) gives each component's identity without
downloading its weights, so a CPU worker that encodes never fetches the transformer and an accelerator
worker never fetches the text encoders. Only safetensors weights are ever fetched.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

from stagediff.errors import StagediffError, one_line
from stagediff.fingerprints import IGNORED_WEIGHTS, digest_cache_folder

CONFIG_PATTERNS = ("model_index.json", "*/*.json")


@dataclass(frozen=True)
class HubSnapshot:
    repo_id: str
    revision: str
    """The commit the snapshot resolved to."""
    folder: Path
    file_digests: dict[str, str]
    """Repository path → `hf:<sha256 or git blob id>`, for every file of the commit."""

    def fetch(self, components: tuple[str, ...]) -> None:
        """Download the components' files (configs, tokenizer files, safetensors weights) into the snapshot."""
        from huggingface_hub import snapshot_download

        try:
            snapshot_download(self.repo_id, revision=self.revision, allow_patterns=[f"{c}/*" for c in components],
                              ignore_patterns=list(IGNORED_WEIGHTS))
        except Exception as error:
            raise StagediffError(f"model {self.repo_id}@{self.revision[:12]}: downloading {', '.join(components)} "
                                 f"failed: {one_line(error)}") from None


    def weight_shapes(self, path: str) -> dict[str, tuple[int, ...]]:
        """Name → shape of the tensors of one safetensors file of the commit, from its header (two small
        range requests; the weights are not downloaded)."""
        from huggingface_hub import HfApi

        try:
            header = HfApi().parse_safetensors_file_metadata(self.repo_id, path, revision=self.revision)
        except Exception as error:
            raise StagediffError(f"model {self.repo_id}@{self.revision[:12]}: reading the header of {path} failed: "
                                 f"{one_line(error)}") from None
        return {name: tuple(info.shape) for name, info in header.tensors.items()}


def open_snapshot(repo_id: str, revision: str | None = None) -> HubSnapshot:
    """The snapshot of `repo_id` at `revision` (default: the Hub's `main`, resolved to its commit now;
    the local cache when offline) with its configs downloaded."""
    from huggingface_hub import snapshot_download

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(CONFIG_PATTERNS)))
    except Exception as error:
        if hub_unreachable(error):
            raise StagediffError(f"model {where}: the Hugging Face Hub cannot be reached or refuses requests now "
                                 f"({one_line(error)}); try again later or pin --model {repo_id}@<commit>") from None
        raise StagediffError(f"model not found: {where} (no such folder; Hugging Face download failed: "
                             f"{one_line(error)})") from None
    return HubSnapshot(repo_id, folder.name, folder, _listing(repo_id, folder.name))


def hub_unreachable(error: Exception) -> bool:
    """A connection failure, a timeout or an answer like 429/5xx: the Hub, not the model, is the problem."""
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    if status is not None:
        return status == 429 or status >= 500
    return not isinstance(error, (FileNotFoundError, ValueError)) or "connect" in str(error).lower()


def _listing(repo_id: str, revision: str) -> dict[str, str]:
    """Path → digest for the commit's files, from the Hub (cached per commit: a commit never changes).
    A Hub that cannot be reached or refuses (429) is a one-line error: keys never come from whichever
    files the local cache happens to hold."""
    cached = digest_cache_folder() / "hub" / repo_id.replace("/", "--") / f"{revision}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    try:
        entries = HfApi().list_repo_tree(repo_id, revision=revision, recursive=True)
        listing = {entry.path: f"hf:{entry.lfs.sha256 if entry.lfs else entry.blob_id}"
                   for entry in entries if isinstance(entry, RepoFile)}
    except Exception as error:
        raise StagediffError(f"model {repo_id}@{revision[:12]}: listing its files on the Hugging Face Hub failed "
                             f"({one_line(error)}); its identity comes from that listing, never from local files "
                             "alone") from None
    cached.parent.mkdir(parents=True, exist_ok=True)
    staged = cached.with_name(f".{cached.name}.{uuid.uuid4().hex}")
    staged.write_text(json.dumps(listing))
    staged.replace(cached)
    return listing
