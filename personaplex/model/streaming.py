"""The one streaming-state mechanism shared by Mimi and the LM.

Implements:
  * `StreamingState`: base of the small per-module state dataclasses. Every tensor field has a
    leading slot (batch) dimension, so one conversation lives in one slot; `reset(mask)`
    resets the chosen slots in place and `select(index)` gives views of some slots.
  * `StreamingModule`: an `nn.Module` that may hold a state while streaming. A module without
    a state runs on whole sequences.
  * `enable_streaming` / `disable_streaming` / `streaming(...)`: create the states of every
    streaming module of a tree (preallocated, updated in place: safe for CUDA graphs).
  * `reset_slots(module, mask)`: reset the chosen slots of a whole tree.
  * `slot_view(module, index)`: run a tree on some slots only (a prefill, a bucket of slots),
    writing through to the full state; `slot_states` + `installed` do the same with views kept
    from one tick to the next; `detached(module)`: run it on a whole clip meanwhile;
  * `fresh_states(module, n)`: states of its own for a tree (work that must not touch the
    slots until it is done: a prompt prefilled in pieces, a voice encoded in pieces), and
    `copy_states(dst, src)` to move such states into a slot, or one slot into another.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields, replace
from typing import Self

import torch
from torch import nn


class StreamingState:
    """Base class for state dataclasses: tensor fields have a leading slot dimension."""

    def reset(self, mask: torch.Tensor) -> None:
        """Reset the slots where `mask` ([B] bool) is True, in place."""
        raise NotImplementedError

    def select(self, index: slice) -> Self:
        """Views of the chosen slots: in-place updates of the views reach this state."""
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)})  # type: ignore[arg-type]


class StreamingModule(nn.Module):
    """A module that keeps a `StreamingState` while streaming and none otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.state: StreamingState | None = None

    def make_state(self, batch_size: int) -> StreamingState | None:
        """Allocate this module's own state (not its children's); None if it has none."""
        return None


def _streaming_modules(root: nn.Module) -> Iterator[StreamingModule]:
    for module in root.modules():
        if isinstance(module, StreamingModule):
            yield module


def enable_streaming(root: nn.Module, batch_size: int) -> None:
    """Give every streaming module of `root` a fresh state with `batch_size` slots."""
    for module in _streaming_modules(root):
        module.state = module.make_state(batch_size)
    reset_slots(root, None)


def disable_streaming(root: nn.Module) -> None:
    for module in _streaming_modules(root):
        module.state = None


@contextmanager
def streaming(root: nn.Module, batch_size: int) -> Iterator[None]:
    enable_streaming(root, batch_size)
    try:
        yield
    finally:
        disable_streaming(root)


def reset_slots(root: nn.Module, mask: torch.Tensor | None) -> None:
    """Reset the slots where `mask` is True (all slots when `mask` is None)."""
    for module in _streaming_modules(root):
        state = module.state
        if state is None:
            continue
        if mask is None:
            first = getattr(state, fields(state)[0].name)  # type: ignore[arg-type]
            state.reset(torch.ones(first.shape[0], dtype=torch.bool, device=first.device))
        else:
            state.reset(mask)


SwappedStates = list[tuple[StreamingModule, StreamingState | None]]


def slot_states(root: nn.Module, index: slice) -> SwappedStates:
    """Views of the slots `index` of every state in `root`, to install with `installed`. The
    views stay valid as long as the states do (they are updated in place), so they can be kept."""
    return [(m, m.state.select(index) if m.state is not None else None) for m in _streaming_modules(root)]


@contextmanager
def installed(states: SwappedStates) -> Iterator[None]:
    """Within the block, each module holds the given state; its own comes back afterwards."""
    saved = [(module, module.state) for module, _ in states]
    for module, state in states:
        module.state = state
    try:
        yield
    finally:
        for module, state in saved:
            module.state = state


def fresh_states(root: nn.Module, batch_size: int) -> SwappedStates:
    """New states for every streaming module of `root`, reset, for use with `installed`."""
    states: SwappedStates = []
    for module in _streaming_modules(root):
        state = module.make_state(batch_size)
        if state is not None:
            first = getattr(state, fields(state)[0].name)  # type: ignore[arg-type]
            state.reset(torch.ones(batch_size, dtype=torch.bool, device=first.device))
        states.append((module, state))
    return states


def copy_states(dst: SwappedStates, src: SwappedStates) -> None:
    """Copy every tensor of `src` into `dst` in place (same modules, same number of slots), so
    that views, CUDA graphs and other holders of `dst`'s tensors see the new values."""
    assert len(dst) == len(src), "states of different trees"
    for (module, to), (other, from_) in zip(dst, src, strict=True):
        assert module is other, "states of different modules"
        if to is None or from_ is None:
            assert to is from_, "a state on one side only"
            continue
        for f in fields(to):  # type: ignore[arg-type]
            getattr(to, f.name).copy_(getattr(from_, f.name))


def slot_view(root: nn.Module, index: slice):  # -> context manager
    """Within the block, every streaming module of `root` sees only the slots `index`."""
    return installed(slot_states(root, index))


def detached(root: nn.Module):  # -> context manager
    """Within the block, `root` runs on whole sequences: its streaming states are set aside."""
    return installed([(module, None) for module in _streaming_modules(root)])


def slot_mask(batch_size: int, slot: int, device: torch.device) -> torch.Tensor:
    mask = torch.zeros(batch_size, dtype=torch.bool, device=device)
    mask[slot] = True
    return mask
