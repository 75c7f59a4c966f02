"""The tick's input and outputs in host memory: pinned buffers, asynchronous copies, a done test.

Implements `HostBuffers` (pinned on CUDA, plain elsewhere) and `HostFrame`, a tick's results in
them: the engine thread copies a tick's input in and its outputs out without waiting for the
device, and sleeps until `HostFrame.ready()` instead of blocking the interpreter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..model.config import FRAME_SIZE


@dataclass
class HostFrame:
    """A tick's results in host memory; read them once `ready()` is true."""

    pcm: np.ndarray  # [B, 1920] float32 agent audio
    text: np.ndarray  # [B] int64 text ids
    ready: Callable[[], bool]


class HostBuffers:
    """Pinned host buffers for the tick's input and outputs (plain ones without CUDA), so that
    the copies to and from the device are asynchronous and the device can be waited on."""

    def __init__(self, num_slots: int, device: torch.device) -> None:
        self.device = device
        pinned = device.type == "cuda"
        self.pcm_in = torch.zeros(num_slots, FRAME_SIZE, pin_memory=pinned)
        self.pcm_out = torch.zeros(num_slots, FRAME_SIZE, pin_memory=pinned)
        self.text_out = torch.zeros(num_slots, dtype=torch.long, pin_memory=pinned)

    def event(self) -> Callable[[], bool]:
        """A test of whether the work queued so far on the device is done."""
        if self.device.type != "cuda":
            return lambda: True
        with torch.cuda.device(self.device):
            done = torch.cuda.Event()
            done.record()
        return done.query
