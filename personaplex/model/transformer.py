"""Transformer building blocks shared by Mimi and the LM.

Implements RMSNorm (float32 math, eps 1e-8), interleaved RoPE (one complex multiplication for q
and k together), the gated SiLU MLP, the ring KV cache with per-slot positions (written with one
scatter per tensor), multi-head attention, a pre-norm layer and a layer stack.
Every matrix is an `nn.Linear`; the state dict keeps the release checkpoint's names
(`self_attn.in_proj_weight`, `norm1.alpha`, `gating.linear_in`, `linear1`, `layer_scale_1.scale`,
...; `release_names`).

Ring KV cache semantics (README, "Where we differ from the reference", 1): a query at position p attends to the keys
at positions p-context+1 .. p, exactly, at every length. The reference fork labels the oldest
ring entry with a future position once the ring has wrapped and so hides it; upstream Kyutai
fixed that and the models were trained without it, so we implement the correct window. The
fork and this code therefore agree until the first wrap (Mimi frame 124, LM step 3000).

Pinned prompt (README, "Where we differ from the reference", 6): with `pinning`
on, a slot whose `pinned` count P > 0 keeps the keys and values of its first P steps (the system
prompt) in ring entries 0..P-1 for the whole conversation; later steps slide through the other
`context - P` entries. Positions are cache-relative: once the window is full, the query is
placed at position `context - 1` for the pinned keys (it keeps its own position for the
sliding keys, whose distances are unchanged), so the window always looks as it did when it
first filled. Only the query is rotated twice; the cache is never rotated again. Until the
window is full this is exactly the plain ring.

Attention over what each slot holds (`prefix_attention.py`): in the LM's ring a one-step
query sees exactly the first `min(offset + 1, context)` entries, so compiled one-step calls read
only those, through flex attention over per-slot lengths; other calls use the boolean mask.

The ring holds `context + chunk - 1` entries, `chunk` being the largest number of steps one
streaming call adds (Mimi: 2 encoder steps per frame, LM: 1). Such calls write first and then
attend over the ring. A longer call (a prefill, a whole voice prompt) attends over the old
ring entries followed by the new keys before writing them, which is exact for any length.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import BlockMask, pinned_attention, prefix_attention, prefix_mask
from .formats import compute_dtype
from .kv_cache import KVCacheState, new_kv_state
from .release_names import keep_release_names
from .streaming import StreamingModule, StreamingState


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (`rms_norm_f32`): `x * rsqrt(mean(x^2) + eps) * alpha`, as one
    `rms_norm`. `alpha` stays float32 whatever the model's dtype (its math is float32, and a
    bf16 scale would be cast at every call): on `.to()` and when a checkpoint is loaded."""

    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.alpha.view(-1), self.eps).to(x.dtype)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.alpha.data = self.alpha.data.float()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "alpha" in state_dict:
            state_dict[prefix + "alpha"] = state_dict[prefix + "alpha"].float()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


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


def rope_rotation(positions: torch.Tensor, head_dim: int, max_period: float) -> torch.Tensor:
    """e^(i * angle) of the interleaved RoPE pairs at `positions` [B, T], as (cos, sin) pairs:
    [B, T, 1, 1, head_dim/2, 2] float32, for q and k of shape [B, T, 2, H, head_dim]."""
    ds = torch.arange(head_dim // 2, device=positions.device, dtype=torch.float32)
    freqs = torch.exp(ds * (-math.log(max_period) * 2 / head_dim))
    angles = freqs * positions.float()[:, :, None, None, None]  # [B, T, 1, 1, D/2]
    return torch.stack([angles.cos(), angles.sin()], dim=-1)  # no complex op: compiled plans stay real


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs (x[2i], x[2i+1]) of x [..., D] in float32, then cast back:
    (x[2i] + i x[2i+1]) * e^(i * angle), one complex multiplication. Compiled, the same product
    in real arithmetic, x * cos + (-x[2i+1], x[2i]) * sin (Inductor generates no complex
    kernels; it fuses these into one, whose output is a tensor of x's shape, not a view)."""
    if torch.compiler.is_compiling():
        xf = x.float()
        a, b = xf.unflatten(-1, (-1, 2)).unbind(-1)  # [..., D/2] each
        cos, sin = (part.repeat_interleave(2, dim=-1) for part in rotation.unbind(-1))  # [..., D] each
        return (xf * cos + torch.stack([-b, a], dim=-1).flatten(-2) * sin).to(x.dtype)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [..., D/2]
    return torch.view_as_real(pairs * torch.view_as_complex(rotation)).flatten(-2).to(x.dtype)


@dataclass
class AttentionPlan:
    """What every layer of one forward needs, computed once per forward (not per layer)."""

    mask: torch.Tensor | None  # [B or 1, 1, T, S] bool, True = attend; None on the prefix route
    rotation: torch.Tensor | None  # RoPE, [B or 1, T, 1, 1, D/2, 2] (cos, sin)
    write_index: torch.Tensor | None  # [B, H, T', D] ring entries to write, for scatter_ (streaming only)
    write_from: int  # first of the T new steps that is written (a call longer than the ring)
    attend_new_separately: bool  # long call: attend over [old ring, new keys], then write
    pinned_rotation: torch.Tensor | None = None  # pinning: the query's RoPE for pinned keys, [B, T, 1, D/2, 2]
    pinned_keys: torch.Tensor | None = None  # pinning: [B, 1, 1, S] bool, True where a key is pinned
    prefix: BlockMask | None = None  # the prefix route (`prefix_attention`): the filled ring entries of each slot


class Attention(StreamingModule):
    """Multi-head self-attention: `in_proj` (q, k, v rows, the release's `in_proj_weight`) and `out_proj`."""

    def __init__(self, dim: int, num_heads: int, capacity: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.capacity = capacity
        self.in_proj = nn.Linear(dim, 3 * dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.kv_cache = "bf16"  # the ring's format (`kv_cache.KV_FORMATS`): the model's own dtype, or fp8
        keep_release_names(self, {"in_proj_weight": ["in_proj.weight"]})

    def make_state(self, batch_size: int) -> KVCacheState:
        dim = self.out_proj.out_features
        shape = (batch_size, self.num_heads, self.capacity, dim // self.num_heads)
        return new_kv_state(self.kv_cache, shape, compute_dtype(self.in_proj), self.in_proj.weight.device)

    def forward(self, x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.in_proj(x).view(B, T, 3, self.num_heads, -1)  # [B, T, 3, H, Dh]
        if plan.prefix is None:
            qk = qkv[:, :, :2] if plan.rotation is None else apply_rope(qkv[:, :, :2], plan.rotation)  # q and k at once
            q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, T, Dh] each
        else:  # the query in a tensor of its own, made as [B, H, T, Dh]: what the CPU flex kernel takes
            assert plan.rotation is not None
            rotation = plan.rotation[:, :, 0]  # [B, T, 1, D/2, 2]
            q = apply_rope(qkv[:, :, 0].transpose(1, 2), rotation.transpose(1, 2))
            k = apply_rope(qkv[:, :, 1], rotation).transpose(1, 2)
        v = qkv[:, :, 2].transpose(1, 2)  # [B, H, T, Dh]
        keys, values = self._complete(k, v, plan)
        q_pinned = None
        if plan.pinned_rotation is not None:
            q_pinned = apply_rope(qkv[:, :, 0], plan.pinned_rotation).transpose(1, 2)  # [B, H, T, Dh]
        if plan.prefix is not None:
            out = prefix_attention(q, q_pinned, keys, values, plan.prefix)
        elif q_pinned is None:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=plan.mask)
        else:
            assert plan.mask is not None and plan.pinned_keys is not None
            out = pinned_attention(q, q_pinned, keys, values, plan.mask, plan.pinned_keys)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, D))

    def _complete(self, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.state
        if state is None:
            return k, v
        assert isinstance(state, KVCacheState)
        if plan.attend_new_separately:  # the new keys as stepping will read them back from the ring
            old_keys, old_values = state.read(k.dtype)
            keys = torch.cat([old_keys, state.rounded(k)], dim=2)
            values = torch.cat([old_values, state.rounded(v)], dim=2)
        assert plan.write_index is not None
        state.write(plan.write_index, k[:, :, plan.write_from :], v[:, :, plan.write_from :])  # each slot at its own entries
        if plan.attend_new_separately:
            return keys, values
        return state.read(k.dtype)


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


def run_layer(layer: TransformerLayer, x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """One layer of a forward: what a `LayerRunner` does, and may do otherwise (compiled)."""
    return layer(x, plan)


LayerRunner = Callable[[TransformerLayer, torch.Tensor, AttentionPlan], torch.Tensor]


@dataclass
class OffsetState(StreamingState):
    offset: torch.Tensor  # [B] long: steps seen since the slot's reset
    pinned: torch.Tensor  # [B] long: the first steps kept for the whole conversation (0: none)
    advance: torch.Tensor  # [B] long: 1, or 0 for a parked slot (`park`): it stays at offset 0

    def reset(self, mask: torch.Tensor) -> None:
        self.offset.masked_fill_(mask, 0)
        self.pinned.masked_fill_(mask, 0)
        self.advance.masked_fill_(mask, 1)

    def park(self, mask: torch.Tensor) -> None:
        """Slots that hold no conversation but still step in a batch: they stay empty (each step
        overwrites entry 0), so on the prefix route they cost one key until their next reset."""
        self.reset(mask)
        self.advance.masked_fill_(mask, 0)


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
        self.pinning = False  # whether slots may pin their first steps (`OffsetState.pinned`); LM only (chunk 1)
        # One-step calls read only each slot's filled entries (`attention.prefix_attention`; the
        # LM's ring only): fast compiled, slower than the masked path eagerly.
        self.prefix_attention = False
        self.layers = nn.ModuleList(
            TransformerLayer(dim, num_heads, self.capacity, hidden, mimi_style) for _ in range(num_layers)
        )

    def set_kv_cache(self, name: str) -> None:
        """The format of every layer's ring (`kv_cache.KV_FORMATS`), before streaming starts."""
        for layer in self.layers:
            layer.self_attn.kv_cache = name

    def make_state(self, batch_size: int) -> OffsetState:
        device = self.layers[0].self_attn.in_proj.weight.device
        zeros = torch.zeros(batch_size, dtype=torch.long, device=device)
        return OffsetState(offset=zeros, pinned=zeros.clone(), advance=torch.ones_like(zeros))

    def forward(self, x: torch.Tensor, run: LayerRunner = run_layer) -> torch.Tensor:
        """x [B, T, dim] -> [B, T, dim]; `run` runs each layer."""
        plan = self._plan(x)
        for layer in self.layers:
            x = run(layer, x, plan)
        if self.state is not None:
            assert isinstance(self.state, OffsetState)
            self.state.offset.add_(self.state.advance * x.shape[1])
        return x

    def _plan(self, x: torch.Tensor) -> AttentionPlan:
        _, T, D = x.shape
        steps = torch.arange(T, device=x.device)
        head_dim = D // self.num_heads
        state = self.state
        if state is None:
            q_pos = steps[None]  # [1, T]
            rotation = rope_rotation(q_pos, head_dim, self.max_period)
            return AttentionPlan(self._window(q_pos, q_pos, torch.zeros_like(q_pos[:, :1]), None), rotation, None, 0, False)
        assert isinstance(state, OffsetState)
        start = state.offset[:, None]  # [B, 1]
        q_pos = start + steps  # [B, T]
        rotation = rope_rotation(q_pos, head_dim, self.max_period)
        pinned = state.pinned[:, None]  # [B, 1], 0 without pinning: the plain ring
        write_from = max(0, T - self.capacity)
        entries = self._entry(q_pos[:, write_from:], pinned)[:, None, :, None]  # [B, 1, T', 1]
        write_index = entries.expand(-1, self.num_heads, -1, head_dim)  # [B, H, T', Dh]
        if self._attends_prefix(x):
            plan = AttentionPlan(None, rotation, write_index, 0, False)
            plan.prefix = prefix_mask(self.next_read(), self.capacity, state.pinned if self.pinning else None)
            if self.pinning:
                plan.pinned_rotation = self._pinned_rotation(q_pos, pinned, head_dim)
            return plan
        separately = T > self.capacity - self.context + 1
        if not separately:  # writing first only overwrites keys older than every query's window
            k_pos = self._ring_positions(start + T, pinned)
        else:
            k_pos = torch.cat([self._ring_positions(start, pinned), q_pos], dim=1)  # [B, C + T]
        is_pinned = None
        if self.pinning:
            ring = torch.arange(self.capacity, device=x.device)[None] < pinned  # [B, C]
            is_pinned = torch.cat([ring, torch.zeros_like(q_pos, dtype=torch.bool)], dim=1) if separately else ring
        mask = self._window(q_pos, k_pos, pinned, is_pinned)
        plan = AttentionPlan(mask, rotation, write_index, write_from, separately)
        if self.pinning:
            assert is_pinned is not None and self.capacity == self.context, "pinning needs a one-step ring (the LM's)"
            plan.pinned_rotation = self._pinned_rotation(q_pos, pinned, head_dim)
            plan.pinned_keys = is_pinned[:, None, None]  # [B, 1, 1, S]
        return plan

    def next_read(self) -> torch.Tensor:
        """[B] the ring entries each slot's next one-step call reads (its own key written first):
        `min(offset + 1, capacity)`."""
        assert isinstance(self.state, OffsetState)
        return (self.state.offset + 1).clamp(max=self.capacity)

    def _attends_prefix(self, x: torch.Tensor) -> bool:
        """Whether this call reads only the filled ring entries: a one-step call in the LM's ring
        (`capacity == context`) with `prefix_attention` on."""
        return x.shape[1] == 1 and self.prefix_attention and self.capacity == self.context

    def _pinned_rotation(self, q_pos: torch.Tensor, pinned: torch.Tensor, head_dim: int) -> torch.Tensor:
        """The query's RoPE for the pinned keys [B, T, 1, D/2, 2]: once the window is full the
        query stands at context - 1 for them."""
        rel = torch.where(pinned > 0, q_pos.clamp(max=self.context - 1), q_pos)
        return rope_rotation(rel, head_dim, self.max_period)[:, :, 0]

    def _entry(self, pos: torch.Tensor, pinned: torch.Tensor) -> torch.Tensor:
        """The ring entry of each step position [B, T]: the first `pinned` ([B, 1]) steps keep
        their own entries, later ones slide through the others."""
        slide = pinned + torch.remainder(pos - pinned, self.capacity - pinned)
        return torch.where(pos < pinned, pos, slide)

    def _ring_positions(self, end: torch.Tensor, pinned: torch.Tensor) -> torch.Tensor:
        """Position held by each ring entry when `end` ([B, 1]) steps were written; -1 if none."""
        entries = torch.arange(self.capacity, device=end.device)[None]  # [1, C]
        last = end - 1
        slide = last - torch.remainder(last - entries, self.capacity - pinned)  # [B, C]
        held = torch.where(entries < pinned, entries, slide)
        written = torch.where(entries < pinned, entries <= last, slide >= pinned)
        return torch.where(written, held, -1)

    def _window(self, q_pos: torch.Tensor, k_pos: torch.Tensor, pinned: torch.Tensor,
                is_pinned: torch.Tensor | None) -> torch.Tensor:
        """Keys each query sees: the last `context - pinned` steps, and the pinned ones."""
        delta = q_pos[:, :, None] - k_pos[:, None, :]  # [B, T, S]
        sliding = delta < (self.context - pinned)[:, :, None]
        if is_pinned is not None:
            sliding = sliding | is_pinned[:, None, :]
        mask = (k_pos[:, None, :] >= 0) & (delta >= 0) & sliding
        return mask[:, None]  # [B, 1, T, S]
