"""CUDA graphs for the engine's tick: one graph per batch-size bucket, captured once at start-up.

A tick (Mimi encode, the LM step with 8 depformer steps, Mimi decode) is thousands of small
kernels; on a GPU their launch cost, not their work, dominates at small batch. Replaying a
captured graph launches them all at once. The step obeys what capture needs: fixed shapes per
bucket, every state tensor preallocated and updated in place, no host synchronisation, and no
draws from torch's random generators (sampling noise is a hash of per-slot counters).

Capture runs the step a few times (warm-up, as CUDA requires) and so advances the slots it
covers: the engine captures before any conversation starts and resets every slot afterwards.
Outputs live in static buffers: they are valid until the next replay of the same bucket.
Without CUDA the same plumbing runs with the step called again at each replay, which is how
the tests check it on CPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

logger = logging.getLogger(__name__)


def graphs_enabled(device: torch.device) -> bool:
    """On CUDA unless PERSONAPLEX_CUDA_GRAPHS=0 (for debugging and for measuring their gain)."""
    return device.type == "cuda" and os.environ.get("PERSONAPLEX_CUDA_GRAPHS", "1") not in ("0", "no", "false")


@dataclass
class _Captured:
    replay: Callable[[], None]
    static_input: torch.Tensor
    static_output: object  # a dataclass of tensors


class StepGraphs:
    """Captures `step(input, bucket) -> dataclass of tensors` for each bucket and replays it."""

    def __init__(self, step: Callable[[torch.Tensor, int], object], input_shape: Callable[[int], tuple[int, ...]],
                 device: torch.device, warmup: int = 2) -> None:
        self.step = step
        self.input_shape = input_shape
        self.device = device
        self.warmup = warmup
        self._pool = None
        if device.type == "cuda":
            with torch.cuda.device(device):
                self._pool = torch.cuda.graph_pool_handle()
        self._captured: dict[int, _Captured] = {}

    def capture(self, buckets: list[int]) -> None:
        """Capture the largest bucket first so that the smaller ones reuse its memory pool."""
        for bucket in sorted(buckets, reverse=True):
            static_input = torch.zeros(self.input_shape(bucket), device=self.device)
            if self._pool is None:
                self._captured[bucket] = self._emulate(static_input, bucket)
            else:
                with torch.cuda.device(self.device):  # streams, the graph and its pool on our device, whatever the current one
                    self._captured[bucket] = self._capture_cuda(static_input, bucket)
            logger.info("captured the engine step for %d slot(s)", bucket)

    def _capture_cuda(self, static_input: torch.Tensor, bucket: int) -> _Captured:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.step(static_input, bucket)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_output = self.step(static_input, bucket)
        return _Captured(graph.replay, static_input, static_output)

    def _emulate(self, static_input: torch.Tensor, bucket: int) -> _Captured:
        """Without CUDA: the same buffers and calls, the step rerun at each replay (tests the plumbing)."""
        static_output = self.step(static_input, bucket)

        def replay() -> None:
            fresh = self.step(static_input, bucket)
            for f in fields(static_output):  # type: ignore[arg-type]
                getattr(static_output, f.name).copy_(getattr(fresh, f.name))

        return _Captured(replay, static_input, static_output)

    def __contains__(self, bucket: int) -> bool:
        return bucket in self._captured

    def run(self, pcm: torch.Tensor, bucket: int) -> object:
        captured = self._captured[bucket]
        captured.static_input.copy_(pcm)
        captured.replay()
        out = captured.static_output
        return type(out)(**{f.name: getattr(out, f.name) for f in fields(out)})  # type: ignore[arg-type]
