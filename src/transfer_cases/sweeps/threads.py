"""`TorchThreads`: a Hydra callback of the parallel launcher presets that gives each job a fixed number
of torch threads. Jobs that run side by side (joblib, submitit) each default to every core: N jobs on
N cores then run N x N threads and spend their time switching. A job's process may have imported
torch before the job starts (the launcher unpickles the task), so the env var OMP_NUM_THREADS alone
comes too late; torch's own setter does not."""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class TorchThreads(Callback):
    def __init__(self, threads: int = 1) -> None:
        self.threads = threads

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        import torch

        torch.set_num_threads(self.threads)
