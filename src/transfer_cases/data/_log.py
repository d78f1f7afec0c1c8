"""Data messages are said once per run: on rank zero only, not once per DDP process."""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.utilities import rank_zero_only


class RankZeroLogger:
    """The `logging` logger `name`, silent on every process but rank zero."""

    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(name)

    def info(self, msg: str, *args: Any) -> None:
        if rank_zero_only.rank == 0:
            self.logger.info(msg, *args, stacklevel=2)

    def warning(self, msg: str, *args: Any) -> None:
        if rank_zero_only.rank == 0:
            self.logger.warning(msg, *args, stacklevel=2)
