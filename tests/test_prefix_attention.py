"""Attention over each slot's filled ring entries (`prefix_attention`, the compiled tick's route)
equals the masked attention it replaces: the function itself at lengths on either side of a
block edge, pinned or not, eager (flex's reference implementation) and compiled (Inductor's CPU
kernel); the LM stepped through a ring wrap with slots of different ages, on either route; and
a free slot parked, so that its window stays empty."""

from __future__ import annotations

import pytest
import torch

from benchmarks.attention import masked
from personaplex.model.attention import BLOCK, prefix_attention, prefix_mask
from personaplex.model.config import FRAME_SIZE, SamplingParams
from personaplex.model.streaming import reset_slots, streaming
from personaplex.model.transformer import LayerRunner, run_layer
from personaplex.runtime.batch_graphs import compile_piece
from personaplex.runtime.compiled import prefix_route
from personaplex.runtime.engine import Engine

from .test_invariants import random_tokens, small_context_lm

CAPACITY = 2 * BLOCK + 44  # three blocks, the last one short
LENGTHS = [1, BLOCK - 1, BLOCK, BLOCK + 1, CAPACITY]
PINNED = [1, 0, 7, BLOCK, 40]


def inputs(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    B, H, D = len(LENGTHS), 2, 16
    q, q_pinned = (torch.randn(B, H, 1, D, generator=g) for _ in range(2))
    keys, values = (torch.randn(B, H, CAPACITY, D, generator=g) for _ in range(2))
    return q, q_pinned, keys, values


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_the_prefix_route_equals_masked_attention():
    q, _, keys, values = inputs()
    lengths = torch.tensor(LENGTHS)
    out = prefix_attention(q, None, keys, values, prefix_mask(lengths, CAPACITY))
    torch.testing.assert_close(out, masked(q, None, keys, values, lengths), atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_the_pinned_prefix_route_merges_its_two_queries_into_the_masked_softmax():
    q, q_pinned, keys, values = inputs(1)
    lengths, pinned = torch.tensor(LENGTHS), torch.tensor(PINNED)
    pinned[1] = 0  # a slot that pins nothing: its pinned row sees no key
    pinned = torch.minimum(pinned, lengths)  # a slot still taking its prompt sees only pinned keys
    out = prefix_attention(q, q_pinned, keys, values, prefix_mask(lengths, CAPACITY, pinned))
    torch.testing.assert_close(out, masked(q, q_pinned, keys, values, lengths, pinned), atol=1e-5, rtol=0)


def test_compiled_the_prefix_route_equals_masked_attention_at_every_length():
    q, _, keys, values = inputs(2)
    run = torch.compile(lambda q, k, v, m: prefix_attention(q, None, k, v, m), fullgraph=True, dynamic=False)
    for shift in (0, 50, 200):  # one graph for every length
        lengths = (torch.tensor(LENGTHS) + shift).clamp(max=CAPACITY)
        out = run(q, keys, values, prefix_mask(lengths, CAPACITY))
        torch.testing.assert_close(out, masked(q, None, keys, values, lengths), atol=1e-5, rtol=0)


def stream(lm, tokens: torch.Tensor, pinned: list[int], restart: int, layer: LayerRunner = run_layer) -> torch.Tensor:
    """Step tokens [B, 17, T] one at a time (each layer run by `layer`); slot b pins its first
    pinned[b] steps; slot 1 starts over at step `restart`, so the slots' rings are of different ages."""
    B, _, T = tokens.shape
    with streaming(lm, B):
        state = lm.transformer.state
        out = []
        for t in range(T):
            if t == restart:
                reset_slots(lm, torch.arange(B) == 1)
            for b, p in enumerate(pinned):
                if state.offset[b] == p:
                    state.pinned[b] = p
            out.append(lm.forward_embeddings(lm.embed(tokens[..., t : t + 1]), layer))
        return torch.cat(out, dim=1)


@pytest.mark.parametrize("pinning", [False, True])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@torch.inference_mode()
def test_the_lm_stepped_on_the_prefix_route_equals_the_masked_route(pinning):
    context = BLOCK + 20  # wraps, and crosses a block edge, within the steps
    lm = small_context_lm(context)
    lm.transformer.pinning = pinning
    tokens = torch.cat([random_tokens(lm.cfg, context + 40, seed=s) for s in (5, 6, 7)])
    pinned = [9, 3, 0] if pinning else [0, 0, 0]
    plain = stream(lm, tokens, pinned, restart=60)
    lm.transformer.prefix_attention = True  # eagerly too: flex attention's reference implementation
    prefix = stream(lm, tokens, pinned, restart=60)
    torch.testing.assert_close(prefix, plain, atol=1e-5, rtol=0)


def test_the_route_is_the_compiled_lms_and_not_mimis_nor_pinned_slots_compiled_on_a_cpu(models):
    """Mimi's ring holds two encoder steps a call (`capacity > context`): never a prefix."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not prefix_route(None, compiling=False, pinning=False, device=cpu)  # eager: the masked path is faster
    assert prefix_route(None, compiling=True, pinning=False, device=cpu) and prefix_route(None, True, True, cuda)
    assert not prefix_route(None, compiling=True, pinning=True, device=cpu)  # no log-sum-exp from the CPU kernel
    assert not prefix_route(False, compiling=True, pinning=False, device=cuda) and prefix_route(True, False, False, cpu)
    mimi = models.mimi.encoder_transformer.transformer
    mimi.prefix_attention = True
    try:
        assert not mimi._attends_prefix(torch.zeros(1, 1, 4))
    finally:
        mimi.prefix_attention = False


@torch.inference_mode()
def test_the_compiled_lm_steps_on_the_prefix_route_with_one_graph_and_equals_the_masked_route():
    context = BLOCK + 20
    lm = small_context_lm(context)
    tokens = torch.cat([random_tokens(lm.cfg, context + 40, seed=s) for s in (8, 9)])
    plain = stream(lm, tokens, [0, 0], restart=60)
    lm.transformer.prefix_attention = True
    layer = compile_piece(run_layer, every_batch=False)
    with streaming(lm, 2):
        lm.forward_embeddings(lm.embed(tokens[..., :1]), layer)  # compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = stream(lm, tokens, [0, 0], restart=60, layer=layer)
    torch.testing.assert_close(compiled, plain, atol=1e-5, rtol=0)


@torch.inference_mode()
def test_a_parked_slot_stays_empty_until_its_start_and_full_windows_are_the_worst_case(models):
    engine = Engine(models, num_slots=2)
    state = models.lm.transformer.state
    engine.park(1)
    for _ in range(3):
        engine.step(torch.zeros(2, FRAME_SIZE))
    assert state.offset.tolist() == [3, 0]  # the free slot stepped, its window did not fill
    engine.start(1, engine.prompt(engine.voice("TESTV0"), "hi"), SamplingParams(greedy=True))
    started = int(state.offset[1])
    engine.park(0)
    engine.park(0)  # again: nothing more
    engine.step(torch.zeros(2, FRAME_SIZE))
    assert state.offset.tolist() == [0, started + 1]
    with engine.full_windows():
        assert state.offset.tolist() == [models.lm.transformer.context] * 2
        engine.step(torch.zeros(2, FRAME_SIZE))
    assert state.offset.tolist() == [0, 0] and state.advance.tolist() == [1, 1]  # every slot afresh
