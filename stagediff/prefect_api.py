"""Which Prefect API this machine talks to, read without importing Prefect (that takes seconds):
`PREFECT_API_URL` in the environment or in the active profile of `$PREFECT_HOME/profiles.toml`."""

from __future__ import annotations

import json
import os
import tomllib
import urllib.request
from pathlib import Path


def active_profile() -> tuple[str, dict]:
    """(name, settings) of the active Prefect profile; ("", {}) without a profiles file."""
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    try:
        profiles = tomllib.loads((home / "profiles.toml").read_text())
    except (FileNotFoundError, tomllib.TOMLDecodeError):
        return "", {}
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    return active, profiles.get("profiles", {}).get(active, {})


def prefect_setting(name: str) -> tuple[str | None, str]:
    """(value, where it comes from) of a Prefect setting: the environment first, then the profile."""
    if os.environ.get(name):
        return os.environ[name], name
    profile, settings = active_profile()
    if settings.get(name):
        return str(settings[name]), f"profile {profile!r}"
    return None, ""


def prefect_api_url() -> tuple[str | None, str]:
    """(URL, where it comes from) of the Prefect API; (None, "") when none is configured."""
    url, source = prefect_setting("PREFECT_API_URL")
    return (url.rstrip("/") if url else None), source


def api_request(url: str, path: str, body: dict | None = None, timeout: float = 5.0):
    """GET (or POST `body`) `url + path`, the JSON answer; sends `PREFECT_API_KEY` when one is set."""
    headers = {"Content-Type": "application/json"}
    key, _ = prefect_setting("PREFECT_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method="GET" if body is None else "POST", headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")
