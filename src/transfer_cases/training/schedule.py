"""A resumed run's learning-rate schedule, planned from the current config."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities.types import LRSchedulerConfig

from transfer_cases.utils.config import instantiate_clean


def replan_restored_schedules(configs: list[LRSchedulerConfig], scheduler: dict[str, Any]) -> None:
    """A resume follows the schedule of the current config, from the restored position.

    Lightning restores a scheduler's whole state, so its settings are the interrupted run's: a
    cosine planned for 2 epochs, resumed with `trainer.max_epochs=4`, keeps `T_max=2` and its
    learning rate climbs back up. Here (after the restore: `on_train_start`) a scheduler built
    from the current config on a stand-in optimizer with the same base learning rates is stepped
    to the restored `last_epoch`; its state and learning rates replace the restored ones. So the
    resumed run has the learning rate a run planned from the start with the current settings has
    at that epoch (for `CosineAnnealingLR`, its closed form at `last_epoch` with the new `T_max`):
    the schedule is re-planned, not stretched from the current learning rate. Schedulers driven by
    a metric (`ReduceLROnPlateau`) cannot be replayed and keep their restored state.
    """
    for config in configs:
        restored = config.scheduler
        if not isinstance(restored, torch.optim.lr_scheduler.LRScheduler) or isinstance(
            restored, torch.optim.lr_scheduler.ReduceLROnPlateau
        ):
            continue
        groups = restored.optimizer.param_groups
        stand_in = torch.optim.SGD(
            [{"params": [torch.zeros(1)], "lr": g.get("initial_lr", g["lr"])} for g in groups]
        )
        planned = instantiate_clean(scheduler)(stand_in)
        for _ in range(restored.last_epoch):
            stand_in.step()  # no gradients: only the order of calls the scheduler expects
            planned.step()
        restored.load_state_dict(planned.state_dict())
        for group, lr in zip(groups, planned.get_last_lr(), strict=True):
            group["lr"] = lr
