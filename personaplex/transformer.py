"""Transformer building blocks shared by Mimi and the LM.

Implements RMSNorm (float32 math, eps 1e-8), interleaved RoPE, the gated SiLU MLP, the ring KV
cache with per-slot positions, multi-head attention, a pre-norm layer and a layer stack.
Module attribute names follow the release checkpoint (`self_attn.in_proj_weight`,
`norm1.alpha`, `gating.linear_in`, `linear1`, `layer_scale_1.scale`, ...).

Ring KV cache semantics (REFERENCE_SPEC decision 1): a query at position p attends to the keys
at positions p-context+1 .. p, exactly, at every length. The reference fork labels the oldest
ring entry with a future position once the ring has wrapped and so hides it; upstream Kyutai
fixed that and the models were trained without it, so we implement the correct window. The
fork and this code therefore agree until the first wrap (Mimi frame 124, LM step 3000).

The ring holds `context + chunk - 1` entries, `chunk` being the largest number of steps one
streaming call adds (Mimi: 2 encoder steps per frame, LM: 1). Such calls write first and then
attend over the ring. A longer call (a prefill, a whole voice prompt) attends over the old
ring entries followed by the new keys before writing them, which is exact for any length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .streaming import StreamingModule, StreamingState


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (`rms_norm_f32`): `alpha * rsqrt(mean(x^2) + eps)` then `* x`."""

    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        var = self.eps + torch.mean(x32**2, dim=-1, keepdim=True)
        return (x32 * (self.alpha.float() * torch.rsqrt(var))).to(x.dtype)


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class GatedMLP(nn.Module):
    """SwiGLU-style MLP (`ActivationGating`): the first half of `linear_in` is the SiLU gate."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_in(x)
        gate, up = h.unflatten(-1, (2, -1)).unbind(-2)  # [..., H] each
        return self.linear_out(F.silu(gate) * up)


def rope_tables(positions: torch.Tensor, head_dim: int, max_period: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the interleaved RoPE angles, [B, 1, T, head_dim/2], float32."""
    ds = torch.arange(head_dim // 2, device=positions.device, dtype=torch.float32)
    freqs = torch.exp(ds * (-math.log(max_period) * 2 / head_dim))
    angles = freqs * positions.float()[:, None, :, None]  # [B, 1, T, D/2]
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) in float32, then cast back: x is [B, H, T, D]."""
    pairs = x.unflatten(-1, (-1, 2))  # [B, H, T, D/2, 2]
    xr, xi = pairs[..., 0].float(), pairs[..., 1].float()
    out_r = xr * cos - xi * sin
    out_i = xr * sin + xi * cos
    return torch.stack([out_r.to(x.dtype), out_i.to(x.dtype)], dim=-1).flatten(-2)


@dataclass
class AttentionPlan:
    """What every layer of one forward needs, computed once per forward (not per layer)."""

    mask: torch.Tensor  # [B or 1, 1, T, S] bool, True = attend
    cos: torch.Tensor | None  # RoPE tables, [B or 1, 1, T, D/2]
    sin: torch.Tensor | None
    write_index: torch.Tensor | None  # [B, T] ring entries to write (streaming only)
    write_from: int  # first of the T new steps that is written (a call longer than the ring)
    attend_new_separately: bool  # long call: attend over [old ring, new keys], then write


@dataclass
class KVCacheState(StreamingState):
    keys: torch.Tensor  # [B, H, C, D]
    values: torch.Tensor  # [B, H, C, D]

    def reset(self, mask: torch.Tensor) -> None:
        # Nothing to clear: entries are invalid until written, through the stack's offsets.
        pass


class Attention(StreamingModule):
    """Multi-head self-attention with one fused `in_proj_weight` (q, k, v rows) and `out_proj`."""

    def __init__(self, dim: int, num_heads: int, capacity: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.capacity = capacity
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def make_state(self, batch_size: int) -> KVCacheState:
        dim = self.out_proj.weight.shape[0]
        shape = (batch_size, self.num_heads, self.capacity, dim // self.num_heads)
        w = self.in_proj_weight
        return KVCacheState(
            keys=torch.zeros(shape, device=w.device, dtype=w.dtype),
            values=torch.zeros(shape, device=w.device, dtype=w.dtype),
        )

    def forward(self, x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        B, T, D = x.shape
        qkv = F.linear(x, self.in_proj_weight).view(B, T, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, T, Dh] each
        if plan.cos is not None:
            q, k = apply_rope(q, plan.cos, plan.sin), apply_rope(k, plan.cos, plan.sin)
        keys, values = self._complete(k, v, plan)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=plan.mask)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, D))

    def _complete(self, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.state
        if state is None:
            return k, v
        assert isinstance(state, KVCacheState)
        if plan.attend_new_separately:
            keys = torch.cat([state.keys, k], dim=2)
            values = torch.cat([state.values, v], dim=2)
        assert plan.write_index is not None
        B = k.shape[0]
        rows = torch.arange(B, device=k.device)[:, None]  # [B, 1]
        cols = plan.write_index[:, plan.write_from :]  # [B, T']
        state.keys[rows, :, cols] = k[:, :, plan.write_from :].transpose(1, 2)  # [B, T', H, Dh]
        state.values[rows, :, cols] = v[:, :, plan.write_from :].transpose(1, 2)
        if plan.attend_new_separately:
            return keys, values
        return state.keys, state.values


class TransformerLayer(nn.Module):
    """Pre-norm layer. LM flavour: RMSNorm + gated MLP. Mimi flavour: LayerNorm + GELU MLP + LayerScale."""

    def __init__(self, dim: int, num_heads: int, capacity: int, hidden: int, mimi_style: bool) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads, capacity)
        self.mimi_style = mimi_style
        if mimi_style:
            self.norm1: nn.Module = nn.LayerNorm(dim, eps=1e-5)
            self.norm2: nn.Module = nn.LayerNorm(dim, eps=1e-5)
            self.linear1 = nn.Linear(dim, hidden, bias=False)
            self.linear2 = nn.Linear(hidden, dim, bias=False)
            self.layer_scale_1 = LayerScale(dim)
            self.layer_scale_2 = LayerScale(dim)
        else:
            self.norm1 = RMSNorm(dim)
            self.norm2 = RMSNorm(dim)
            self.gating = GatedMLP(dim, hidden)

    def forward(self, x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        if self.mimi_style:
            x = x + self.layer_scale_1(self.self_attn(self.norm1(x), plan))
            h = self.linear2(F.gelu(self.linear1(self.norm2(x))))
            return x + self.layer_scale_2(h)
        x = x + self.self_attn(self.norm1(x), plan)
        return x + self.gating(self.norm2(x))


@dataclass
class OffsetState(StreamingState):
    offset: torch.Tensor  # [B] long: steps seen since the slot's reset

    def reset(self, mask: torch.Tensor) -> None:
        self.offset.masked_fill_(mask, 0)


class Transformer(StreamingModule):
    """A causal stack with a sliding attention window of `context` steps and RoPE positions."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_layers: int,
        hidden: int,
        context: int,
        max_period: float,
        chunk: int,
        mimi_style: bool,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.context = context
        self.max_period = max_period
        self.capacity = context + chunk - 1
        self.layers = nn.ModuleList(
            TransformerLayer(dim, num_heads, self.capacity, hidden, mimi_style) for _ in range(num_layers)
        )

    def make_state(self, batch_size: int) -> OffsetState:
        device = self.layers[0].self_attn.in_proj_weight.device
        return OffsetState(offset=torch.zeros(batch_size, dtype=torch.long, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._plan(x)
        for layer in self.layers:
            x = layer(x, plan)
        if self.state is not None:
            assert isinstance(self.state, OffsetState)
            self.state.offset.add_(x.shape[1])
        return x

    def _plan(self, x: torch.Tensor) -> AttentionPlan:
        _, T, D = x.shape
        steps = torch.arange(T, device=x.device)
        head_dim = D // self.num_heads
        state = self.state
        if state is None:
            q_pos = steps[None]  # [1, T]
            cos, sin = rope_tables(q_pos, head_dim, self.max_period)
            return AttentionPlan(self._window(q_pos, q_pos), cos, sin, None, 0, False)
        assert isinstance(state, OffsetState)
        start = state.offset[:, None]  # [B, 1]
        q_pos = start + steps  # [B, T]
        cos, sin = rope_tables(q_pos, head_dim, self.max_period)
        write_index = q_pos % self.capacity  # [B, T]
        write_from = max(0, T - self.capacity)
        if T <= self.capacity - self.context + 1:
            # Writing first only overwrites keys older than every query's window.
            k_pos = self._ring_positions(start + T)
            return AttentionPlan(self._window(q_pos, k_pos), cos, sin, write_index, write_from, False)
        k_pos = torch.cat([self._ring_positions(start), q_pos], dim=1)  # [B, C + T]
        return AttentionPlan(self._window(q_pos, k_pos), cos, sin, write_index, write_from, True)

    def _ring_positions(self, end: torch.Tensor) -> torch.Tensor:
        """Position held by each ring entry when `end` ([B, 1]) steps were written; -1 if none."""
        entries = torch.arange(self.capacity, device=end.device)[None]  # [1, C]
        last = end - 1
        pos = last - torch.remainder(last - entries, self.capacity)  # [B, C]
        return pos  # negative where never written

    def _window(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        delta = q_pos[:, :, None] - k_pos[:, None, :]  # [B, T, S]
        mask = (k_pos[:, None, :] >= 0) & (delta >= 0) & (delta < self.context)
        return mask[:, None]  # [B, 1, T, S]
