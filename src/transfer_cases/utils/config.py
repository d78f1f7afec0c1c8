"""Small glue between Hydra configs and the package: resolvers and error-preserving instantiate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from transfer_cases.utils.errors import TransferCasesError
from transfer_cases.utils.paths import asset_path


def register_resolvers() -> None:
    """`${asset:NAME}` is the path of an embedded asset, wherever the package is installed."""
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", lambda name: str(asset_path(name)))


def to_dict(cfg: Any) -> Any:
    """Resolved plain containers: what goes into checkpoints must load with `weights_only=True`."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def instantiate_clean(cfg: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, but our own errors surface as themselves, not wrapped by Hydra."""
    try:
        return instantiate(cfg, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, TransferCasesError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def record_checked_config(cfg: DictConfig) -> None:
    """Rewrite the run's `.hydra/config.yaml` with the checked config when the checks normalised a value
    (`cache.enabled=no` to false, a checkpoint `mode` following its metric): Hydra saved the config as
    composed, before the checks, and the file must say what the run used."""
    from hydra.core.hydra_config import HydraConfig

    from transfer_cases.utils.atomic import atomic_write_text

    if not HydraConfig.initialized() or not HydraConfig.get().output_subdir:
        return
    runtime = HydraConfig.get().runtime.output_dir
    path = Path(runtime) / HydraConfig.get().output_subdir / "config.yaml"
    text = OmegaConf.to_yaml(cfg)
    if path.is_file() and path.read_text() != text:
        atomic_write_text(path, text, what="run config")
