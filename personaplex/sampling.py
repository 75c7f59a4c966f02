"""Token sampling on the device, with a counter-based random generator per slot.

Implements `SamplingParams`, `sample_tokens` (greedy, or temperature + top-k through the
exponential race `argmax(p / q)`, q ~ Exp(1), as the reference does) and `race_noise`.

The noise is a hash of (slot seed, slot step, stream, vocabulary index) instead of draws from a
`torch.Generator`: each conversation gets its own reproducible stream whatever else runs in the
batch, the whole batch is one set of tensor ops with no host synchronisation, and it is safe to
capture in a CUDA graph. It does not reproduce the reference's random numbers, which depend on
the order of every draw on the device (REFERENCE_SPEC 8.17; decision 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    """Per-conversation decoding settings; the defaults are the reference's."""

    temp_text: float = 0.7
    topk_text: int = 25
    temp_audio: float = 0.8
    topk_audio: int = 250
    greedy: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("temp_text", "temp_audio"):
            if not 0.0 <= getattr(self, name) <= 10.0:
                raise ValueError(f"{name} must be between 0 and 10, got {getattr(self, name)}")
        for name in ("topk_text", "topk_audio"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (no limit) or positive, got {getattr(self, name)}")

    @property
    def text_temperature(self) -> float:
        return 0.0 if self.greedy else self.temp_text

    @property
    def audio_temperature(self) -> float:
        return 0.0 if self.greedy else self.temp_audio


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x < 2**32 without int64 overflow (16-bit halves of c)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + ((x * hi) & 0xFFFF) * 65536) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche (C. Wellons' "lowbias32")."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def race_noise(seed: torch.Tensor, step: torch.Tensor, stream: int, size: int) -> torch.Tensor:
    """Exp(1) noise [B, size] for each slot's (seed [B], step [B]) and a stream id."""
    key = _mix32((seed & _MASK32) ^ _mix32((step * 64 + stream) & _MASK32))  # [B]
    index = torch.arange(size, device=seed.device, dtype=torch.int64)
    bits = _mix32(key[:, None] ^ _mul32(index, 0x9E3779B9)[None])  # [B, size]
    uniform = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))  # (0, 1)
    return -torch.log(uniform)


def sample_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """logits [B, V] -> tokens [B]. Per slot: greedy where temperature <= 0, else top-k
    (0 = the whole vocabulary) sampling at that temperature, using the Exp(1) noise [B, V]."""
    logits = logits.float()
    V = logits.shape[-1]
    greedy = logits.argmax(dim=-1)
    scaled = logits / temperature.clamp(min=1e-5)[:, None]
    k = torch.where((top_k <= 0) | (top_k > V), V, top_k)  # [B]
    kth = scaled.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])  # [B, 1]
    # argmax(p / q) == argmax(log p - log q); log p is `scaled` up to a per-row constant.
    race = torch.where(scaled >= kth, scaled - torch.log(noise), -torch.inf)
    return torch.where(temperature > 0, race.argmax(dim=-1), greedy)
