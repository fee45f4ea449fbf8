"""JAX's persistent compilation cache, so a second process (or a warm worker) with the same shapes
skips XLA compilation. Hits and misses are counted from JAX's own monitoring events."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

CACHE_VARIABLE = "STAGEDIFF_COMPILE_CACHE"
"""Folder (or gs:// URI on TPU VMs) of the cache; `off` disables it."""
HIT_EVENT = "/jax/compilation_cache/cache_hits"
MISS_EVENT = "/jax/compilation_cache/cache_misses"


@dataclass
class CacheStats:
    directory: str | None = None
    hits: int = 0
    misses: int = 0


stats = CacheStats()
_lock = threading.Lock()


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "stagediff" / "jax")


def enable_compile_cache(directory: str | None = None) -> CacheStats:
    """Point JAX at a persistent cache (idempotent); every compiled program is cached, however small."""
    import jax
    from jax import monitoring

    with _lock:
        if stats.directory is not None:
            return stats
        directory = directory or os.environ.get(CACHE_VARIABLE) or default_cache_dir()
        if directory == "off":
            return stats
        if "://" not in directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        monitoring.register_event_listener(_count)
        stats.directory = directory
        return stats


def _count(event: str, **kwargs) -> None:
    if event == HIT_EVENT:
        stats.hits += 1
    elif event == MISS_EVENT:
        stats.misses += 1
