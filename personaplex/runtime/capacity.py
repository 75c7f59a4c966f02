"""Capacity: how much of a device one conversation takes, and how many conversations it serves.

Implements `lm_weight_bytes` (the LM's weights in a format, counted on the meta device: no
memory), `slot_bytes` (a slot's KV cache in its format, and Mimi's states), `slots_that_fit` and
`suggest_slots` (as many slots as the free GPU memory holds after the weights), `check_formats`
(a format the device cannot run, refused at start), `choose_weights` (what `--weights auto`
takes), `check_room` (what cannot fit, refused before any download), `cpu_threads` (torch's
share of a CPU's cores), `tick_ms` (a tick of every slot with full attention windows, measured on
the engine thread) and `fit_slots` (no more calls than one tick serves within `MAX_TICK_MS`).
"""

from __future__ import annotations

import os
import time

import torch

from ..errors import SettingsError
from ..model.config import FRAME_SIZE, KV_FORMATS, WEIGHT_FORMATS, ModelConfig
from ..model.formats import weight_bytes_as
from ..model.lm import LMModel
from ..model.loading import CheckpointError
from .engine import Engine
from .worker import EngineWorker

SLOT_MEMORY_RESERVE = 4 * 1024**3  # activations, CUDA graphs, allocator slack
MAX_TICK_MS = 70.0  # calls are taken only as long as one tick of all of them stays under this
LARGE_MODEL_BYTES = 2 * 1024**3  # bf16 weights beyond this: the 7B, not a test model
AUTO_SLOTS = 8  # --weights auto: bf16 where it leaves room for this many conversations, else int8
FP8_CAPABILITY = (8, 9)  # Ada and Hopper: Triton's float8 (and the GPU's fp8 matmul)


def cpu_threads() -> int:
    """Torch threads for a model on the CPU: half the cores. The other half serve every call's
    WebRTC and Opus work on the event loop; with all cores, torch's busy-waiting threads and the
    event loop take turns and live audio comes late (measured on 2 cores: 72 of 245 frames of a
    20 s call came too late with 2 threads, none with 1)."""
    return max(1, (os.cpu_count() or 2) // 2)


def lm_weight_bytes(config: ModelConfig, weights: str, dtype: torch.dtype = torch.bfloat16) -> int:
    """The bytes of the LM's weights in format `weights` (`formats`), computing in `dtype`; counted
    on the meta device (no memory, no download)."""
    with torch.device("meta"):
        lm = LMModel(config.lm).to(dtype)
    return weight_bytes_as(lm, weights)


def slot_bytes(config: ModelConfig, kv_cache: str, dtype: torch.dtype) -> int:
    """Device memory one conversation slot holds: the LM's KV cache in format `kv_cache`
    (`kv_cache.KV_FORMATS`; "bf16": in `dtype`) plus Mimi's states."""
    lm, mimi = config.lm, config.mimi
    if kv_cache == "fp8":  # a byte an element, and a byte of exponent a vector
        kv = 2 * lm.num_layers * lm.context * (lm.dim + lm.num_heads)
    else:
        kv = 2 * lm.num_layers * lm.context * lm.dim * torch.tensor([], dtype=dtype).element_size()
    mimi_kv = 2 * 2 * mimi.transformer.num_layers * (mimi.transformer.context + 1) * mimi.transformer.d_model * 4
    return kv + mimi_kv + 8 * 1024**2


def slots_that_fit(free: int, config: ModelConfig, kv_cache: str, dtype: torch.dtype, cap: int = 64) -> int:
    """Slots in `free` bytes of device memory after the weights, at most `cap`. One slot's worth
    more is kept for the engine's own work: a prompt is prefilled in states of its own before it is
    copied into its slot (`Engine.start_pieces`)."""
    return max(0, min(cap, int((free - SLOT_MEMORY_RESERVE) // slot_bytes(config, kv_cache, dtype)) - 1))


def suggest_slots(config: ModelConfig, kv_cache: str, dtype: torch.dtype, device: torch.device, cap: int = 64) -> int:
    """As many slots as the free device memory holds now (the weights loaded), at least one."""
    if device.type != "cuda":
        return 4
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, slots_that_fit(free, config, kv_cache, dtype, cap))


def check_formats(device: torch.device, weights: str, kv_cache: str) -> None:
    """Refuse at once, in one line that says what to use, a format this build or device cannot run."""
    if weights not in (*WEIGHT_FORMATS, "auto"):
        raise SettingsError(f"unknown weight format {weights!r}: use one of auto, {', '.join(WEIGHT_FORMATS)}")
    if kv_cache not in KV_FORMATS:
        raise SettingsError(f"unknown KV cache format {kv_cache!r}: use one of {', '.join(KV_FORMATS)}")
    if device.type == "cuda" and "fp8" in (weights, kv_cache) and torch.cuda.get_device_capability(device) < FP8_CAPABILITY:
        major, minor = torch.cuda.get_device_capability(device)
        raise SettingsError(
            f"fp8 needs a GPU of compute capability {FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} or newer (L4, L40S, H100, "
            f"H200); this {torch.cuda.get_device_name(device)} is {major}.{minor}: use --weights int8 --kv-cache bf16"
        )


def choose_weights(config: ModelConfig, device: torch.device, kv_cache: str, asked: str) -> tuple[str, str]:
    """The weight format to load, and why ("" when it was asked for): "auto" is bf16 where it
    leaves room for `AUTO_SLOTS` conversations, else int8 (on a CPU: bf16, the model's own)."""
    if asked != "auto":
        return asked, ""
    if device.type != "cuda":
        return "bf16", ""
    free, _ = torch.cuda.mem_get_info(device)
    room = slots_that_fit(free - lm_weight_bytes(config, "bf16"), config, kv_cache, torch.bfloat16)
    if room >= AUTO_SLOTS:
        return "bf16", f"bf16 weights leave room for {room} conversations"
    return "int8", f"bf16 weights would leave room for {room} conversations, fewer than {AUTO_SLOTS}: int8 weights"


def check_room(config: ModelConfig, device: torch.device, cpu_asked: bool, weights: str = "bf16",
               kv_cache: str = "bf16") -> torch.dtype | None:
    """Refuse early, before a 17 GB download, what cannot fit; the LM dtype to load with (None:
    the device's default). `cpu_asked`: the person chose the CPU for a large model knowingly.
    8-bit weights are quantized a matrix at a time on their way to the device: it needs room for
    them alone (the full-width weights stay in host memory while they load)."""
    size = lm_weight_bytes(config, weights)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        need = size + 2 * slot_bytes(config, kv_cache, torch.bfloat16) + SLOT_MEMORY_RESERVE // 2  # a slot, and a prefill's
        if free < need:
            advice = "" if weights != "bf16" else "; --weights int8 halves the weights"
            raise CheckpointError(
                f"this GPU has {free / 2**30:.1f} GB free of {total / 2**30:.1f} GB; the model needs about "
                f"{need / 2**30:.0f} GB for its weights ({weights}) and one conversation{advice}"
            )
        return None
    full = lm_weight_bytes(config, "bf16")
    if not cpu_asked and full > LARGE_MODEL_BYTES:
        raise CheckpointError(
            "no CUDA GPU found: the 7B model needs one with 24 GB or more (on a CPU it runs far slower than "
            "real time). Start with --device cpu to try anyway, or try the page with the tiny test model: "
            "--checkpoint tests/fixtures/tiny/checkpoint --config tests/fixtures/tiny/checkpoint/tiny_config.json"
        )
    return torch.bfloat16 if full > LARGE_MODEL_BYTES else None  # a 7B in float32 would not fit in RAM


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
