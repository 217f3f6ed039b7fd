"""The process-wide feature stores: one memory shared by every model of a process (one backbone pass per image)."""

from __future__ import annotations

from pathlib import Path

from conceptclef.core.config import DataConfig
from conceptclef.training.feature_store import DEFAULT_MAX_BYTES, FeatureStore, MemoryTier

_PROCESS_MEMORY = MemoryTier(DEFAULT_MAX_BYTES)
_SHARED: dict[tuple[str, bool, bool], FeatureStore] = {}


def shared_feature_store(directory: str | Path | None = None, beside_images: bool = False, retain: bool = True) -> FeatureStore:
    """The process's store for these disk settings; all of them share one memory (one pass per process)."""
    settings = (str(directory or ""), beside_images, retain)
    if settings not in _SHARED:
        _SHARED[settings] = FeatureStore(directory, beside_images, retain=retain, memory=_PROCESS_MEMORY)
    return _SHARED[settings]


def feature_store_for(data: DataConfig) -> FeatureStore:
    """The store a pipeline stage should give its models (`data.feature_cache`, `data.feature_cache_dir`)."""
    if data.feature_cache == "off":
        return shared_feature_store(retain=False)
    if data.feature_cache == "memory":
        return shared_feature_store()
    return shared_feature_store(data.feature_cache_dir or None, beside_images=not data.feature_cache_dir)
