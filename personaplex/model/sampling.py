"""Token sampling on the device, with a counter-based random generator per slot.

Implements `sample_tokens` (greedy, or temperature + top-k through the
exponential race `argmax(p / q)`, q ~ Exp(1), as the reference does), `stream_keys` and
`race_noise`.
The settings themselves are `config.SamplingParams`.

The noise is a hash of (slot seed, slot step, stream, vocabulary index) instead of draws from a
`torch.Generator`: each conversation gets its own reproducible stream whatever else runs in the
batch, the whole batch is one set of tensor ops with no host synchronisation, and it is safe to
capture in a CUDA graph. It does not reproduce the reference's random numbers, which depend on
the order of every draw on the device (README, "Where we differ from the reference", 5).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_MASK32 = 0xFFFFFFFF


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


def stream_keys(seed: torch.Tensor, step: torch.Tensor, streams: int) -> torch.Tensor:
    """The hash keys [B, streams] of each slot's (seed [B], step [B]) for streams 0..streams-1:
    made once per step for all of them (text and every codebook), not once per draw."""
    ids = torch.arange(streams, device=seed.device)[None]  # [1, S]
    return _mix32((seed & _MASK32)[:, None] ^ _mix32((step[:, None] * 64 + ids) & _MASK32))  # [B, S]


def race_noise(key: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise [B, K] for the token ids `tokens` [B, K] of a stream whose keys are `key` [B]
    (`stream_keys`): the noise of a token does not depend on which other tokens are drawn."""
    # Token ids are below 2**16, so their product with a 32-bit constant fits in int64.
    bits = _mix32(key[:, None] ^ ((tokens * 0x9E3779B9) & _MASK32))  # [B, K]
    uniform = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))  # (0, 1)
    return -torch.log(uniform)


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    noise: Callable[[torch.Tensor], torch.Tensor],
    max_top_k: int,
) -> torch.Tensor:
    """logits [B, V] -> tokens [B]. Per slot: greedy where temperature <= 0, else sampling at that
    temperature among its top_k (<= max_top_k) tokens; `noise(token_ids [B, K])` gives Exp(1) noise."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)  # the first maximum, as the reference
    values, ids = logits.topk(min(max_top_k, logits.shape[-1]), dim=-1)  # [B, K], descending
    scaled = values / temperature.clamp(min=1e-5)[:, None]
    ranks = torch.arange(values.shape[-1], device=logits.device)[None]
    # argmax(p / q) == argmax(log p - log q); log p is `scaled` up to a per-row constant.
    race = torch.where(ranks < top_k[:, None], scaled - torch.log(noise(ids)), -torch.inf)
    sampled = ids.gather(1, race.argmax(dim=-1, keepdim=True))[:, 0]
    return torch.where(temperature > 0, sampled, greedy)
