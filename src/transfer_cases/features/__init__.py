"""Features once: a fully frozen body's pooled features, computed once per cache key and reused."""

from transfer_cases.features.backend import BACKENDS, choose_backend
from transfer_cases.features.cached import body_fingerprint, cached_features
from transfer_cases.features.datamodule import CachedFeatureDataModule, FeatureCache
from transfer_cases.features.extract import EXTRACTIONS, Extraction, extract, resolve_extraction
from transfer_cases.features.onnx_body import BackendUnavailable, OnnxBody
from transfer_cases.features.store import FeatureSet, FeatureStore, cache_key

__all__ = [
    "BACKENDS",
    "EXTRACTIONS",
    "BackendUnavailable",
    "CachedFeatureDataModule",
    "Extraction",
    "FeatureCache",
    "FeatureSet",
    "FeatureStore",
    "OnnxBody",
    "body_fingerprint",
    "cache_key",
    "cached_features",
    "choose_backend",
    "extract",
    "resolve_extraction",
]
