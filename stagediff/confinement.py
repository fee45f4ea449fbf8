"""Where a run may read and write. On shared workers `STAGEDIFF_ALLOWED_ROOTS` names the roots (local
folders and `gs://bucket/prefix`es, separated by commas): stores, model folders, manifest copies and
prompt files must lie under one of them, anything else fails the run at once. Unset, nothing is
restricted (the CLI and `make serve` on a user's own machine). Either way only plain local paths and
gs:// URIs are accepted (any other scheme is refused, never handed to fsspec), and with roots set a gs://
URI may not hold `.` or `..` segments. Run names are confined always: they name a folder of the store."""

from __future__ import annotations

import os
import posixpath
import re

from stagediff.errors import StagediffError

ALLOWED_ROOTS_VARIABLE = "STAGEDIFF_ALLOWED_ROOTS"
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_run_name(name: str | None) -> None:
    """A run name is one folder name: letters, digits, `.`, `_` and `-`, starting with a letter or digit."""
    if name is not None and not RUN_NAME.fullmatch(name):
        raise StagediffError(f"--run-name {name!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a "
                             "letter or digit")


def check_location(option: str, location: str) -> None:
    """Fail with a one-line error when `location` is not a plain local path or a gs:// URI (any other
    scheme would reach fsspec, which opens it with a filesystem of its own choosing), or, with roots
    set, when it has `.`/`..` segments (gcsfs uses them literally) or lies outside the allowed roots."""
    check_scheme(option, location)
    roots = allowed_roots()
    if roots is None:
        return
    if location.startswith("gs://") and any(part in (".", "..") for part in location[5:].split("/")):
        raise StagediffError(f"{option} {location}: '.' and '..' segments are not allowed in gs:// URIs while "
                             f"{ALLOWED_ROOTS_VARIABLE} is set")
    resolved = _resolve(location)
    if not any(resolved == root or resolved.startswith(root.rstrip("/") + "/") for root in roots):
        raise StagediffError(f"{option} {location} is outside the roots this worker allows ({ALLOWED_ROOTS_VARIABLE}="
                             f"{os.environ[ALLOWED_ROOTS_VARIABLE]})")


def check_scheme(option: str, location: str) -> None:
    """Only plain local paths and gs:// URIs: `file://`, `gcs://`, `memory://`, chained `a::b` and any
    other scheme are refused with one line."""
    if location.startswith("gs://"):
        return
    if "://" in location or "::" in location or location.startswith("data:"):
        scheme = location.split("://", 1)[0] if "://" in location else location.split(":", 1)[0]
        raise StagediffError(f"{option} {location}: scheme {scheme!r} is not supported (give a plain local path "
                             "or gs://bucket/path)")


def allowed_roots() -> list[str] | None:
    value = os.environ.get(ALLOWED_ROOTS_VARIABLE, "").strip()
    if not value:
        return None
    return [_resolve(root.strip()) for root in value.split(",") if root.strip()]


def _resolve(location: str) -> str:
    """gs:// URIs normalised (`..` folded), local paths made absolute with links resolved."""
    if location.startswith("gs://"):
        return "gs://" + posixpath.normpath("/" + location.removeprefix("gs://")).lstrip("/")
    return os.path.realpath(os.path.expanduser(location))
