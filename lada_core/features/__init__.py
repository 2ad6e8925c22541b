"""The feature cache: ``ensure_cache(cfg)`` builds or finds it, ``load_bundle(path)`` opens it."""

from lada_core.features.bundle import FeatureBundle, TaskFeatures, cache_splits, ensure_cache, load_bundle
from lada_core.features.cache import CacheError, CacheInfo, build_cache, bundle_splits, cache_key, check_cache

__all__ = [
    "CacheError",
    "CacheInfo",
    "FeatureBundle",
    "TaskFeatures",
    "build_cache",
    "bundle_splits",
    "cache_key",
    "cache_splits",
    "check_cache",
    "ensure_cache",
    "load_bundle",
]
