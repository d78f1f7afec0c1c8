"""Small glue between Hydra configs and the package: resolvers and error-preserving instantiate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from transfer_cases.utils.errors import ConfigError, TransferCasesError
from transfer_cases.utils.paths import asset_path


def register_resolvers() -> None:
    """`${asset:NAME}` is the path of an embedded asset, wherever the package is installed;
    `${on_rank_zero:VALUE,OTHERWISE}` is VALUE in the global rank 0 process, OTHERWISE (None when
    omitted) in the other ranks of a torchrun or SLURM launch."""
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", lambda name: str(asset_path(name)))
    if not OmegaConf.has_resolver("on_rank_zero"):
        OmegaConf.register_new_resolver("on_rank_zero", on_rank_zero)


def on_rank_zero(value: Any, otherwise: Any = None) -> Any:
    """`value` in the global rank 0 process (or a process outside any launch), else `otherwise`.

    Under torchrun or srun every rank runs Hydra before Lightning starts: Hydra's own outputs (the
    `.hydra/` config copies, the log file) name themselves with this so that only rank 0 writes them.
    The rank is Lightning's, read from the launcher's environment (RANK, LOCAL_RANK, SLURM_PROCID).
    """
    from lightning.pytorch.utilities import rank_zero_only

    return value if (getattr(rank_zero_only, "rank", 0) or 0) == 0 else otherwise


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


def instantiate_list(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every `_target_` entry of a group such as `callbacks` or `logger`.

    An entry whose package is missing (wandb, mlflow, ...) names the extra that provides it.
    """
    if not cfg:
        return []
    objects = []
    for key, c in cfg.items():
        if not (isinstance(c, DictConfig) and "_target_" in c):
            continue
        try:
            objects.append(instantiate_clean(c))
        except Exception as e:
            if not _missing_package(e):
                raise
            raise ConfigError(
                f"'{key}' needs a package that is not installed ({_missing_package(e)}); "
                f'install the extra: pip install -e ".[{key}]"'
            ) from None
    return objects


def _missing_package(error: BaseException | None) -> str | None:
    """The message of an ImportError anywhere in the cause chain (Lightning raises ModuleNotFoundError)."""
    return next((str(e).splitlines()[0] for e in exception_chain(error) if isinstance(e, ImportError)), None)


def exception_chain(error: BaseException | None) -> list[BaseException]:
    """`error` and every exception it was raised from or while handling, each once.

    A chain can be a cycle: an error re-raised `from None` while handling a wrapper whose cause it is
    (`instantiate_clean` unwrapping Hydra's InstantiationException) keeps the wrapper as its context,
    so a walk without a visited set never ends."""
    chain: list[BaseException] = []
    pending = [error]
    while pending:
        e = pending.pop(0)
        if e is None or any(e is seen for seen in chain):
            continue
        chain.append(e)
        pending += [e.__cause__, e.__context__]
    return chain
