"""A pinned system prompt: the plain ring until the window is full, then [prompt] + [the last
context - P steps] with cache-relative positions, checked against a whole-sequence reference
written from that definition; batched equals alone with prompts of different lengths; a
prefilled prompt equals a stepped one (the engine on the golden session: test_golden)."""

from __future__ import annotations

import math

import pytest
import torch

from personaplex.model.config import SamplingParams
from personaplex.model.lm import LMModel
from personaplex.model.streaming import streaming
from personaplex.model.transformer import OffsetState
from personaplex.runtime.engine import Engine

from .test_invariants import random_tokens, small_context_lm

CONTEXT = 24
STEPS = 90  # the 17-step sliding part wraps 4 times after the window fills


def rotate(x: torch.Tensor, pos: torch.Tensor, max_period: float) -> torch.Tensor:
    """Interleaved RoPE of x [N, H, D] at positions pos [N], written out pair by pair."""
    d = x.shape[-1]
    freqs = max_period ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = pos.double()[:, None, None] * freqs  # [N, 1, D/2]
    a, b = x[..., 0::2].double(), x[..., 1::2].double()
    out = torch.stack([a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()], dim=-1)
    return out.flatten(-2).to(x.dtype)


def reference_forward(lm: LMModel, x: torch.Tensor, pinned: int) -> torch.Tensor:
    """The temporal transformer over x [T, dim] where step p sees the first `pinned` steps and
    the last context - pinned ones (itself included), at cache-relative positions: once p
    passes context - 1 everything is placed as at p = context - 1."""
    stack, context = lm.transformer, lm.transformer.context
    heads = stack.num_heads
    for layer in stack.layers:
        attn = layer.self_attn
        h = layer.norm1(x[None])[0]
        q, k, v = attn.in_proj(h).view(len(x), 3, heads, -1).unbind(1)  # [T, H, Dh]
        outs = []
        for p in range(len(x)):
            shift = max(0, p - (context - 1)) if pinned else 0
            window = context - pinned
            seen = [*range(min(pinned, p + 1)), *range(max(pinned, p - window + 1), p + 1)]
            idx = torch.tensor(seen)
            key_pos = torch.where(idx < pinned, idx, idx - shift)  # pinned keys keep their place
            qp = rotate(q[p : p + 1], torch.tensor([p - shift]), stack.max_period)  # [1, H, Dh]
            kp = rotate(k[idx], key_pos, stack.max_period)  # [S, H, Dh]
            scores = torch.einsum("qhd,shd->hs", qp, kp) / math.sqrt(q.shape[-1])
            outs.append(torch.einsum("hs,shd->hd", scores.softmax(-1), v[idx]).reshape(-1))
        x = x + attn.out_proj(torch.stack(outs))
        x = x + layer.gating(layer.norm2(x[None])[0])
    return lm.out_norm(x[None])[0]


def stream(lm: LMModel, tokens: torch.Tensor, pinned: list[int], prefill: int = 0) -> torch.Tensor:
    """Step tokens [B, 17, T] one step at a time (after a prefill of `prefill` steps); slot b
    pins its first pinned[b] steps as soon as it has taken them."""
    B, _, T = tokens.shape
    with streaming(lm, B):
        state = lm.transformer.state
        assert isinstance(state, OffsetState)
        out, t = [], 0
        if prefill:
            out.append(lm.forward_embeddings(lm.embed(tokens[..., :prefill])))
            t = prefill
        while t < T:
            for b, p in enumerate(pinned):
                if state.offset[b] == p:
                    state.pinned[b] = p
            out.append(lm.forward_embeddings(lm.embed(tokens[..., t : t + 1])))
            t += 1
        return torch.cat(out, dim=1)


@pytest.fixture(scope="module")
def lm() -> LMModel:
    model = small_context_lm(CONTEXT)
    model.transformer.pinning = True
    return model


@torch.inference_mode()
def test_pinning_is_the_plain_ring_until_the_window_fills_then_differs(lm):
    tokens = random_tokens(lm.cfg, STEPS)
    pinned = stream(lm, tokens, [7])
    lm.transformer.pinning = False
    try:
        plain = stream(lm, tokens, [0])
    finally:
        lm.transformer.pinning = True
    torch.testing.assert_close(pinned[:, :CONTEXT], plain[:, :CONTEXT], atol=1e-5, rtol=0)
    assert not torch.allclose(pinned[:, CONTEXT:], plain[:, CONTEXT:], atol=1e-3)


@pytest.mark.parametrize("pinned", [0, 1, 7, CONTEXT - 1])
@torch.inference_mode()
def test_streaming_equals_the_cache_relative_reference_over_several_wraps(lm, pinned):
    tokens = random_tokens(lm.cfg, STEPS, seed=pinned)
    streamed = stream(lm, tokens, [pinned])[0]
    reference = reference_forward(lm, lm.embed(tokens)[0], pinned)
    torch.testing.assert_close(streamed, reference, atol=2e-5, rtol=0)


@torch.inference_mode()
def test_batched_slots_with_prompts_of_different_lengths_get_what_they_get_alone(lm):
    tokens = torch.cat([random_tokens(lm.cfg, STEPS, seed=s) for s in (1, 2, 3)])
    lengths = [5, 0, 11]
    batched = stream(lm, tokens, lengths)
    for b, p in enumerate(lengths):
        alone = stream(lm, tokens[b : b + 1], [p])
        torch.testing.assert_close(batched[b], alone[0], atol=1e-5, rtol=0)


@torch.inference_mode()
def test_a_prefilled_prompt_equals_a_stepped_one(lm):
    tokens = random_tokens(lm.cfg, STEPS, seed=4)
    stepped = stream(lm, tokens, [9])
    prefilled = stream(lm, tokens, [9], prefill=9)
    torch.testing.assert_close(prefilled, stepped, atol=1e-5, rtol=0)


def test_keep_persona_needs_an_engine_with_pinning(models):
    engine = Engine(models, num_slots=1)
    prompt = engine.prompt(engine.voice("TESTV0"), "hi")
    with pytest.raises(ValueError, match="pinning"):
        engine.start(0, prompt, SamplingParams(), keep_persona=True)
