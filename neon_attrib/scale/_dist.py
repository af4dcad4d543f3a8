"""The few ``torch.distributed`` operations a data-set run needs, as no-ops in a single process.

A run is distributed when the default process group is initialized (``torch.distributed.init_process_group``, as a
script under ``torchrun`` does, or :func:`process_group_from_env`). Objects travel with Python's pickle (small:
settings, errors, sampled rows, a head's state); tensors that are summed use the backend's device (CUDA for NCCL).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["Ranks", "current_ranks", "ensure_process_group", "process_group_from_env", "local_device", "on_rank0"]

T = TypeVar("T")

#: exception types re-raised with their own type on every rank when rank 0 fails (others become RuntimeError)
_PORTABLE_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: ``rank`` of ``world_size`` (0 of 1 without a process group)."""

    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def bind(self, device: torch.device) -> None:
        """Under NCCL, make the model's CUDA ``device`` the current one (object collectives and sums use it)."""
        if self.distributed and device.type == "cuda" and dist.get_backend() == "nccl":
            torch.cuda.set_device(device)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, value: T) -> T:
        """``value`` of rank 0, on every rank."""
        if not self.distributed:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` in rank order on rank 0; None on the others."""
        if not self.distributed:
            return [value]
        values: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, values, dst=0)
        return values

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the ranks (a new tensor on ``tensor``'s device)."""
        if not self.distributed:
            return tensor.clone()
        work = tensor.detach().to(self._device(), copy=True)
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.to(tensor.device)


def current_ranks() -> Ranks:
    """The :class:`Ranks` of the default process group, or ``Ranks()`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(rank=dist.get_rank(), world_size=dist.get_world_size())
    return Ranks()


def local_device() -> torch.device:
    """The device this rank should use: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def ensure_process_group() -> Ranks:
    """The :class:`Ranks` of this process; under ``torchrun`` (``WORLD_SIZE`` > 1) without a process group, one is
    initialized first (NCCL when CUDA is available, each rank on ``cuda:LOCAL_RANK``; gloo otherwise) and left for
    the rest of the script, as a torchrun script's own ``init_process_group`` would be."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _init_from_env()
    return current_ranks()


def _init_from_env() -> None:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device())
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


@contextlib.contextmanager
def process_group_from_env() -> Iterator[Ranks]:
    """Initialize the default process group from ``torchrun``'s environment (``WORLD_SIZE`` > 1, ``RANK``,
    ``MASTER_ADDR``...) for the duration of the block, unless one is initialized already or the process runs alone.

    NCCL when CUDA is available (each rank on ``cuda:LOCAL_RANK``), gloo otherwise. A group created here is destroyed
    on exit; one created by the caller is left alone.
    """
    created = False
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _init_from_env()
        created = True
    try:
        yield current_ranks()
    finally:
        if created:
            dist.destroy_process_group()


def on_rank0(ranks: Ranks, work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0 and give its result to every rank. If it raises, every rank raises: the same exception
    type for the usual user errors (ValueError, TypeError, FileNotFoundError...), a RuntimeError otherwise, with rank
    0's message; so no rank waits forever for a rank that failed."""
    if not ranks.distributed:
        return work()
    outcome: tuple[str, Any]
    if ranks.is_main:
        try:
            outcome = ("ok", work())
        except Exception as exc:  # every rank must learn that rank 0 failed
            outcome = ("error", (type(exc).__name__, str(exc)))
            ranks.broadcast(outcome)
            raise
    else:
        outcome = ("", None)
    outcome = ranks.broadcast(outcome)
    if outcome[0] == "error":
        name, message = outcome[1]
        kind = next((error for error in _PORTABLE_ERRORS if error.__name__ == name), RuntimeError)
        raise kind(message if kind is not RuntimeError else f"rank 0 failed: {name}: {message}")
    return outcome[1]
