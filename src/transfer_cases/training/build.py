"""`build(cfg)`: the composed config → a ready `(module, datamodule)` pair, for the CLI and notebooks."""

from __future__ import annotations

from omegaconf import DictConfig

from transfer_cases.data import ClassificationDataModule
from transfer_cases.training.checkpoint import check_resumable, read_checkpoint, resume_overrides
from transfer_cases.training.module import TransferModule
from transfer_cases.utils.config import instantiate_clean, register_resolvers, to_dict


def build(cfg: DictConfig) -> tuple[TransferModule, ClassificationDataModule]:
    """Instantiate the data module and the model of a composed `train.yaml` config, in this order:

    1. data first: it knows the classes (scanned in the data module's `__init__`, no image decoded);
    2. model second: its head is sized from the number of classes, and their names are stored in the
       checkpoint for prediction;
    3. the weights' preprocessing back into the data: only the chosen weights know the resize, crop
       and normalisation they were trained with, and images must be fed the same way.
    The Trainer calls the data module's `setup` later, so no transform is built with a stale size.
    With `ckpt_path` (a resume), the checkpoint must fit the configured model; the pretrained
    weights are not read, the checkpoint's weights are loaded here, so the body holds the weights
    it continues with before anything reads it (the features of a cached phase above all), and
    the checkpoint's preprocessing is kept.
    Returns the image data module: what each phase trains on, images or the features of the body
    as it is then, is decided per phase by `recipe.phase_data`.

    Example:
        >>> from hydra import compose, initialize_config_dir
        >>> from transfer_cases import build, config_dir
        >>> with initialize_config_dir(str(config_dir()), version_base="1.3"):
        ...     cfg = compose("train", overrides=["case=small_different"])
        >>> module, datamodule = build(cfg)  # doctest: +SKIP
    """
    register_resolvers()
    ckpt_path = cfg.get("ckpt_path")
    checkpoint = read_checkpoint(ckpt_path) if ckpt_path else None
    # 1. data: the classes
    datamodule: ClassificationDataModule = instantiate_clean(cfg.data)
    # 2. model: sized from the data
    module: TransferModule = instantiate_clean(
        cfg.model,
        backbone=to_dict(cfg.backbone),
        case=to_dict(cfg.case),
        num_classes=datamodule.num_classes,
        class_names=list(datamodule.classes),
        _recursive_=False,
        **(resume_overrides(checkpoint) if checkpoint else {}),
    )
    if checkpoint:
        check_resumable(checkpoint, ckpt_path, module)
        # The restored weights, now: Lightning restores them only after the data module's `setup`,
        # which extracts cached features, so they would come from the un-restored body.
        module.load_state_dict(checkpoint["state_dict"])
        module.resume_phase = checkpoint.get("phase", "fit")
    # 3. the weights' preprocessing, pushed back into the data
    datamodule.preprocess = module.preprocess
    module.use_preprocess(datamodule.preprocess)  # with data.image_size applied: what the head sees
    return module, datamodule
