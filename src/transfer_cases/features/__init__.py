"""Features once: a fully frozen body's pooled features, computed once per cache key and reused."""

from transfer_cases.features.cached import body_fingerprint, cached_features
from transfer_cases.features.datamodule import CachedFeatureDataModule, FeatureCache
from transfer_cases.features.extract import EXTRACTIONS, Extraction, extract, resolve_extraction
from transfer_cases.features.store import FeatureSet, FeatureStore, cache_key

__all__ = [
    "EXTRACTIONS",
    "CachedFeatureDataModule",
    "Extraction",
    "FeatureCache",
    "FeatureSet",
    "FeatureStore",
    "body_fingerprint",
    "cache_key",
    "cached_features",
    "extract",
    "resolve_extraction",
]
