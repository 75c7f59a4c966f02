"""Capacity: how much of a device one conversation takes, and how many fit.

Implements `slot_bytes` (a slot's KV cache and Mimi states), `suggest_slots` (as many slots as
the free GPU memory holds after the weights), `lm_parameter_count` (on the meta device: no
memory) and `cpu_threads` (torch's share of a CPU's cores). Arithmetic on configs; `Service`
uses it to refuse early what cannot fit and to size its engine.
"""

from __future__ import annotations

import os

import torch

from ..model.config import ModelConfig
from ..model.lm import LMModel

SLOT_MEMORY_RESERVE = 4 * 1024**3  # activations, CUDA graphs, allocator slack


def cpu_threads() -> int:
    """Torch threads for a model on the CPU: half the cores. The other half serve every call's
    WebRTC and Opus work on the event loop; with all cores, torch's busy-waiting threads and the
    event loop take turns and live audio comes late (measured on 2 cores: 72 of 245 frames of a
    20 s call came too late with 2 threads, none with 1)."""
    return max(1, (os.cpu_count() or 2) // 2)


def lm_parameter_count(config: ModelConfig) -> dict[str, int]:
    with torch.device("meta"):
        return {name: p.numel() for name, p in LMModel(config.lm).named_parameters()}


def slot_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Device memory one conversation slot holds: the LM's KV cache plus Mimi's states."""
    lm, mimi = config.lm, config.mimi
    itemsize = torch.tensor([], dtype=dtype).element_size()
    kv = 2 * lm.num_layers * lm.context * lm.dim * itemsize
    mimi_kv = 2 * 2 * mimi.transformer.num_layers * (mimi.transformer.context + 1) * mimi.transformer.d_model * 4
    return kv + mimi_kv + 8 * 1024**2


def suggest_slots(config: ModelConfig, dtype: torch.dtype, device: torch.device, cap: int = 64) -> int:
    """As many slots as the free device memory holds (after the weights), at most `cap`. One
    slot's worth more is kept for the engine's own work: a prompt is prefilled in states of its
    own before it is copied into its slot (`Engine.start_pieces`)."""
    if device.type != "cuda":
        return 4
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(cap, int((free - SLOT_MEMORY_RESERVE) // slot_bytes(config, dtype)) - 1))
