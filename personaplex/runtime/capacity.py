"""Capacity: how much of a device one conversation takes, and how many conversations it serves.

Implements `slot_bytes` (a slot's KV cache and Mimi states), `suggest_slots` (as many slots as
the free GPU memory holds after the weights), `lm_parameter_count` (on the meta device: no
memory), `check_room` (what cannot fit, refused before any download), `cpu_threads` (torch's
share of a CPU's cores), `tick_ms` (a tick of every slot with full attention windows, measured on
the engine thread) and `fit_slots` (no more calls than one tick serves within `MAX_TICK_MS`).
"""

from __future__ import annotations

import os
import time

import torch

from ..model.config import FRAME_SIZE, ModelConfig
from ..model.lm import LMModel
from ..model.loading import CheckpointError
from .engine import Engine
from .worker import EngineWorker

SLOT_MEMORY_RESERVE = 4 * 1024**3  # activations, CUDA graphs, allocator slack
MAX_TICK_MS = 70.0  # calls are taken only as long as one tick of all of them stays under this
LARGE_MODEL_BYTES = 2 * 1024**3  # bf16 weights beyond this: the 7B, not a test model


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


def check_room(config: ModelConfig, device: torch.device, cpu_asked: bool) -> torch.dtype | None:
    """Refuse early, before a 17 GB download, what cannot fit; the LM dtype to load with (None:
    the device's default). `cpu_asked`: the person chose the CPU for a large model knowingly."""
    weights = 2 * sum(lm_parameter_count(config).values())  # bf16 bytes
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        need = weights + 2 * slot_bytes(config, torch.bfloat16) + SLOT_MEMORY_RESERVE // 2  # a slot, and a prefill's
        if free < need:
            raise CheckpointError(
                f"this GPU has {free / 2**30:.1f} GB free of {total / 2**30:.1f} GB; the model needs about "
                f"{need / 2**30:.0f} GB for its weights and one conversation"
            )
        return None
    if not cpu_asked and weights > LARGE_MODEL_BYTES:
        raise CheckpointError(
            "no CUDA GPU found: the 7B model needs one with 24 GB or more (on a CPU it runs far slower than "
            "real time). Start with --device cpu to try anyway, or try the page with the tiny test model: "
            "--checkpoint tests/fixtures/tiny/checkpoint --config tests/fixtures/tiny/checkpoint/tiny_config.json"
        )
    return torch.bfloat16 if weights > LARGE_MODEL_BYTES else None  # a 7B in float32 would not fit in RAM


def tick_ms(engine: Engine, worker: EngineWorker, bucket: int | None = None) -> float:
    """One batched step over `bucket` slots (all by default), every attention window full, run
    twice on the engine thread; the second one's time."""
    bucket = bucket or engine.num_slots

    def tick() -> float:
        with engine.full_windows():  # what a tick costs once the calls are four minutes old
            start = time.perf_counter()
            out = engine.step(torch.zeros(bucket, FRAME_SIZE), bucket)
            out.pcm.cpu()
            return (time.perf_counter() - start) * 1000

    worker.call(tick).result()
    return worker.call(tick).result()


def fit_slots(engine: Engine, worker: EngineWorker, full_ms: float) -> tuple[int, float]:
    """The largest bucket whose tick (`full_ms` for all slots) stays under `MAX_TICK_MS` (the rest
    of the 80 ms frame is the margin that keeps calls in real time), and its tick; the worker
    takes no more calls than that."""
    usable, measured = engine.num_slots, full_ms
    for bucket in sorted(engine.buckets(), reverse=True)[1:]:
        if measured <= MAX_TICK_MS:
            break
        usable, measured = bucket, tick_ms(engine, worker, bucket)
    worker.max_live = usable
    return usable, measured
