"""One compiled graph per piece of the tick for every batch size (the engine's buckets).

`torch.compile` with static shapes makes one graph per batch size, and each costs a full
compile: an engine of 64 slots (7 buckets) would compile seven times before it is ready. Here
a piece is compiled once, at the engine's largest bucket, with the slot dimension of everything
it reads marked dynamic: its arguments (tensors, dataclasses such as the attention plan, the
flex block mask and the tensors its mask closes over) and the streaming states of the modules
it runs. Every other dimension stays static, as do the weights.

A dynamic size is assumed to be at least 2 (torch specializes 0 and 1, and its size-oblivious
mode still guards on them through views and broadcasts), so such an engine's smallest bucket
is 2: a lone call shares its tick with an idle slot, which costs one block of attention.

The marks matter only while the first call traces (`tracing_every_batch`); afterwards a call of
any bucket passes the graph's guards with no marks at all.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

_tracing = False  # whether calls mark their slot dimensions (`tracing_every_batch`)


@contextmanager
def tracing_every_batch() -> Iterator[None]:
    """Within the block, the first call of a piece made by `compile_piece(..., every_batch=True)`
    compiles it for every batch size."""
    global _tracing
    _tracing = True
    try:
        yield
    finally:
        _tracing = False


def compile_piece(fn: Callable, every_batch: bool) -> Callable:
    """`fn` compiled as one full graph: one for every batch size (within `tracing_every_batch`)
    or, without `every_batch`, one per batch size."""
    if not every_batch:
        return torch.compile(fn, fullgraph=True, dynamic=False)
    compiled = torch.compile(fn, fullgraph=True, dynamic=None)
    owner = getattr(fn, "__self__", None)

    def run(*args):
        if _tracing:
            mark_slots((owner, args))
        return compiled(*args)

    return run


def mark_slots(found: object) -> None:
    """Mark the leading (slot) dimension of every tensor in `found` dynamic."""
    for tensor in _tensors(found, {}):
        if tensor.dim() > 0:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)


def _tensors(found: object, seen: dict[int, object]) -> Iterator[torch.Tensor]:
    if found is None or id(found) in seen:
        return
    seen[id(found)] = found  # held, so that no temporary's id is taken by another
    if isinstance(found, torch.Tensor):
        yield found
    elif isinstance(found, nn.Module):
        for module in found.modules():  # the streaming states (weights are not per slot)
            yield from _tensors(getattr(module, "state", None), seen)
    elif isinstance(found, BlockMask):
        yield from _tensors(found.as_tuple(), seen)  # its block tensors (and sizes, skipped)
        yield from _tensors(_closed_over(found.mask_mod), seen)
    elif dataclasses.is_dataclass(found) and not isinstance(found, type):
        yield from _tensors([getattr(found, f.name) for f in dataclasses.fields(found)], seen)
    elif isinstance(found, (list, tuple)):
        for item in found:
            yield from _tensors(item, seen)


def _closed_over(fn: Callable) -> list[object]:
    return list(inspect.getclosurevars(fn).nonlocals.values()) if inspect.isfunction(fn) else []
