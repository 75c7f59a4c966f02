"""The ring KV cache of one attention layer: in the model's dtype, or in float8 with a scale per vector.

Implements `KVCacheState` (keys and values [B, H, C, D] as computed) and `Fp8KVCacheState`: each
key and value vector stored in float8 e4m3 as `x * 2^-e`, with `e` [B, H, C] int8 the smallest
exponent that brings its largest element within e4m3's 448 (a power of two: scaling is exact,
and the exponent takes one byte, so a slot holds 1 + 1/D bytes per element instead of 2).
`config.KV_FORMATS` names them ("bf16": the model's own dtype, float32 on a CPU; "fp8"). Each state
says how attention uses it: `write` (the new entries, each slot at its own), `read` (the whole
ring in the compute dtype) and `rounded` (new keys as the cache will give them back, so that a
prefill attends over them exactly as stepping will read them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import KV_FORMATS
from .streaming import StreamingState

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value
EXP_RANGE = (-120, 120)  # a vector of zeros takes the smallest; nothing real comes near either end


@dataclass
class KVCacheState(StreamingState):
    keys: torch.Tensor  # [B, H, C, D]
    values: torch.Tensor  # [B, H, C, D]

    def reset(self, mask: torch.Tensor) -> None:
        # Nothing to clear: entries are invalid until written, through the stack's offsets.
        pass

    def write(self, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [B, H, T, D] into the ring entries `index` [B, H, T, D] (each slot at its own)."""
        self.keys.scatter_(2, index, k)
        self.values.scatter_(2, index, v)

    def read(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.values

    def rounded(self, x: torch.Tensor) -> torch.Tensor:
        return x


@dataclass
class Fp8KVCacheState(KVCacheState):
    key_exp: torch.Tensor  # [B, H, C] int8: keys[..., d] * 2^key_exp is the key
    value_exp: torch.Tensor  # [B, H, C] int8

    def write(self, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        for data, exp, x in ((self.keys, self.key_exp, k), (self.values, self.value_exp, v)):
            q, e = to_fp8(x)
            data.view(torch.uint8).scatter_(2, index, q.view(torch.uint8))  # (bytes: no float8 scatter on a CPU)
            exp.scatter_(2, index[..., 0], e)

    def read(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return from_fp8(self.keys, self.key_exp, dtype), from_fp8(self.values, self.value_exp, dtype)

    def rounded(self, x: torch.Tensor) -> torch.Tensor:
        return from_fp8(*to_fp8(x), x.dtype)


def to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (x * 2^-e in float8 [..., D], e [...] int8), e per vector."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)  # [...]
    e = torch.ceil(torch.log2(amax / FP8_MAX)).clamp(*EXP_RANGE)  # (-inf for a zero vector: the smallest)
    scaled = (xf * torch.exp2(-e)[..., None]).clamp(-FP8_MAX, FP8_MAX)
    return scaled.to(FP8), e.to(torch.int8)


def from_fp8(q: torch.Tensor, e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q.to(dtype) * torch.exp2(e.float()).to(dtype)[..., None]


def new_kv_state(name: str, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device) -> KVCacheState:
    """A ring of `shape` [B, H, C, D] in format `name`, for attention computed in `dtype`."""
    if name == "bf16":
        return KVCacheState(keys=torch.zeros(shape, device=device, dtype=dtype),
                            values=torch.zeros(shape, device=device, dtype=dtype))
    assert name == "fp8", f"unknown KV cache format {name!r}: one of {KV_FORMATS}"
    exps = torch.full(shape[:3], EXP_RANGE[0], device=device, dtype=torch.int8)
    return Fp8KVCacheState(keys=torch.zeros(shape, device=device, dtype=FP8), values=torch.zeros(shape, device=device, dtype=FP8),
                           key_exp=exps, value_exp=exps.clone())
