"""Which share of the work this process does, and a meeting point for all ranks that cannot hang forever.

Under Lightning's DDP the data module is set up on every rank after the process group exists, so
`torch.distributed` says who we are; anywhere else (a single process, the advisor before the Trainer
starts) this process is rank 0 of 1 and the meeting is a no-op. The meeting runs on a gloo group of
its own, whatever the training backend (NCCL on GPUs), so it can be given a deadline: a rank that
died closes its connections (the others fail at once), and one that hangs is named when the deadline
passes, instead of every other rank waiting for the process group's half hour.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch.distributed as dist

from transfer_cases.utils.errors import TransferCasesError

_groups: dict[int, Any] = {}  # id(default group) -> our gloo group, made once per process group


class PeerFailed(TransferCasesError, RuntimeError):
    """Another rank failed (or never arrived) while sharing work with this one."""


def world() -> tuple[int, int]:
    """`(rank, world size)` of this process: `(0, 1)` without an initialised process group. Called by
    every rank at the same point (before its share of the work), it also makes the meeting's group."""
    if dist.is_available() and dist.is_initialized():
        _group()
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _group() -> Any:
    """Our gloo group. Made by every rank together (a collective): call it where all ranks are, before
    any of them starts on work that may fail or hang (`world` does)."""
    default = dist.group.WORLD
    if id(default) not in _groups:
        _groups.clear()  # a new process group (a second Trainer in this process): a new side group
        _groups[id(default)] = dist.new_group(backend="gloo")
    return _groups[id(default)]


def meet(
    status: dict[str, Any],
    *,
    timeout_s: float,
    what: str,
    passed_on: tuple[type[Exception], ...] = (),
) -> list[dict[str, Any]]:
    """Every rank's `status`, in rank order, once all ranks have called `meet` for the same `what`.

    A rank still missing `timeout_s` after this one arrived is named in a `PeerFailed`, and so is a
    rank whose status carries an `error` (this rank's own error is left for the caller to raise); an
    error whose `error_type` names one of `passed_on` is raised as that type, so every rank handles it
    alike (a backend that cannot run the body falls back on every rank)."""
    rank, size = world()
    if size == 1:
        return [status]
    group = _group()
    try:
        dist.monitored_barrier(group, timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
        statuses: list[Any] = [None] * size
        dist.all_gather_object(statuses, status, group=group)
    except RuntimeError as e:
        raise PeerFailed(
            f"rank {rank}: another rank did not finish its part ({what}) within {timeout_s:.0f} s of this "
            f"one, or exited ({str(e).splitlines()[0]}); its own log says why"
        ) from None
    for r, s in enumerate(statuses):
        if r != rank and s.get("error") and not status.get("error"):
            kind = next((k for k in passed_on if k.__name__ == s.get("error_type")), None)
            raise (kind or PeerFailed)(f"rank {r} failed ({what}): {s['error']}")
    return statuses
