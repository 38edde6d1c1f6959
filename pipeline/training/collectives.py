"""Collectives the training code uses, written so a single process (no process group) works too.
Imported as `collectives`; `tdist` is torch.distributed (the name `dist` is never ours).

Each function is a collective when a process group exists: every rank must call it, in the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as tdist


def is_distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(this rank, world size); (0, 1) in a single process without a process group."""
    return (tdist.get_rank(), tdist.get_world_size()) if is_distributed() else (0, 1)


def backend() -> str:
    """The process group's backend (gloo, nccl), or "none" in a single process."""
    return str(tdist.get_backend()) if is_distributed() else "none"


def tensor_device() -> torch.device:
    """Where collective tensors must live: the current GPU under NCCL, else the CPU."""
    if is_distributed() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce_op(op: str) -> Any:
    return tdist.ReduceOp.MAX if op == "max" else tdist.ReduceOp.SUM


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if is_distributed():
        tdist.all_reduce(t, op=_reduce_op(op))
    return t


def all_reduce_async(t: torch.Tensor, op: str = "sum") -> Callable[[], torch.Tensor]:
    """Start an all-reduce of `t` in place; the returned function waits for it and returns `t`."""
    if not is_distributed():
        return lambda: t
    work = tdist.all_reduce(t, op=_reduce_op(op), async_op=True)

    def wait() -> torch.Tensor:
        work.wait()
        return t

    return wait


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (small JSON-like objects only: pickled)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (small picklable objects)."""
    if not is_distributed():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_true(flag: bool) -> bool:
    """True on every rank iff `flag` is true on every rank."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=tensor_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
    return bool(t.item() == 1.0)


def average_buffers(module: torch.nn.Module) -> None:
    """Average floating buffers (BatchNorm running statistics) over ranks.

    DeepSpeed, unlike DDP, never syncs buffers, so each rank's BatchNorm statistics drift apart on its
    own shards. Averaging them before eval and save makes eval, the checkpoint and the exported model
    agree (timm's `distribute_bn(reduce=True)` does the same).
    """
    if not is_distributed() or tdist.get_world_size() == 1:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            tdist.all_reduce(buffer)
            buffer.div_(tdist.get_world_size())
