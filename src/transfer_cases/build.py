"""`build(cfg)`: the composed config → a ready `(module, datamodule)` pair, for the CLI and notebooks."""

from __future__ import annotations

from omegaconf import DictConfig

from transfer_cases.config import instantiate_clean, register_resolvers, to_dict
from transfer_cases.data import ClassificationDataModule
from transfer_cases.module import TransferModule


def build(cfg: DictConfig) -> tuple[TransferModule, ClassificationDataModule]:
    """Instantiate the data module and the model of a composed `train.yaml` config.

    The data decides the number of classes and their names; the backbone's weights decide the
    preprocessing, which is handed back to the data module so images are fed as the weights expect.

    Example:
        >>> from hydra import compose, initialize_config_dir
        >>> from transfer_cases import build, config_dir
        >>> with initialize_config_dir(str(config_dir()), version_base="1.3"):
        ...     cfg = compose("train", overrides=["case=small_different"])
        >>> module, datamodule = build(cfg)  # doctest: +SKIP
    """
    register_resolvers()
    datamodule: ClassificationDataModule = instantiate_clean(cfg.data)
    module: TransferModule = instantiate_clean(
        cfg.model,
        backbone=to_dict(cfg.backbone),
        case=to_dict(cfg.case),
        num_classes=datamodule.num_classes,
        class_names=list(datamodule.classes),
        _recursive_=False,
    )
    datamodule.preprocess = module.preprocess
    return module, datamodule
