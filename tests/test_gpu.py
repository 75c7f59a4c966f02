"""CUDA only (skipped elsewhere): the graphed engine gives what the eager engine gives, compiled
or not, and the compiled engine's greedy tokens are the uncompiled engine's in float32."""

from __future__ import annotations

import pytest
import torch

from personaplex.model.config import TINY, SamplingParams
from personaplex.model.loading import load_models, resolve_checkpoint
from personaplex.runtime.engine import Engine

from .helpers import CHECKPOINT, user_audio

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def session_tokens(cuda_graphs: bool, greedy: bool, compile: bool = False) -> torch.Tensor:
    models = load_models(resolve_checkpoint(CHECKPOINT), TINY, "cuda", torch.float32)
    engine = Engine(models, num_slots=4, cuda_graphs=cuda_graphs, pinning=True, compile=compile)
    assert engine.compiled is compile and engine.compile_failed is None
    prompt = engine.prompt(engine.voice("TESTV0"), "You enjoy having a good conversation.")
    engine.start(1, prompt, SamplingParams(greedy=greedy, seed=5), keep_persona=True)
    tokens = []
    for frame in user_audio(12, seed=9):
        batch = torch.zeros(2, frame.numel())
        batch[1] = frame
        tokens.append(engine.step(batch, bucket=2).tokens[1].cpu())
    return torch.stack(tokens)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("greedy", [True, False])
def test_cuda_graphs_replay_what_eager_computes(greedy, compile):
    assert torch.equal(session_tokens(True, greedy, compile), session_tokens(False, greedy, compile))


def test_the_compiled_engine_gives_the_greedy_tokens_of_the_uncompiled_one_in_float32():
    assert torch.equal(session_tokens(True, True, compile=True), session_tokens(False, True, compile=False))


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_7b_heads_in_bf16_graphed_equal_eager_in_any_bucket_order(compile):
    """The 7B's widths and heads at 2 layers, in bf16 as the release runs: each bucket's graph,
    replayed in any order after capture (4, 2, 4, the smallest, 4), gives what the same engine gives
    without graphs, through the pinned host buffers the engine thread uses; compiled or not
    (in bf16 compiled kernels round differently from eager ones, so each is compared with
    itself). Every slot keeps its persona, as in the app."""
    import dataclasses

    import numpy as np

    from benchmarks.step import persona, random_models
    from personaplex.model.config import FRAME_SIZE, PERSONAPLEX_7B

    lm = dataclasses.replace(PERSONAPLEX_7B.lm, num_layers=2, depformer_num_layers=2)
    config = dataclasses.replace(PERSONAPLEX_7B, lm=lm)

    def run(cuda_graphs: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        models = random_models(config, torch.device("cuda"), torch.bfloat16)
        engine = Engine(models, num_slots=4, cuda_graphs=cuda_graphs, pinning=True, compile=compile)
        assert engine.cuda_graphs is cuda_graphs and engine.graphs_failed is None
        assert engine.compiled is compile and engine.compile_failed is None
        for slot in range(4):
            engine.start(slot, persona(config, seed=slot), SamplingParams(seed=slot), keep_persona=True)
        g = torch.Generator().manual_seed(0)
        outs = []
        for bucket in (4, 2, 4, engine.buckets()[0], 4):  # compiled, the smallest is 2 (`batch_graphs`)
            frame = engine.step_host((0.1 * torch.randn(bucket, FRAME_SIZE, generator=g)).numpy(), bucket)
            while not frame.ready():
                pass
            outs.append((frame.pcm.copy(), frame.text.copy()))
        return outs

    for (pcm_a, text_a), (pcm_b, text_b) in zip(run(False), run(True), strict=True):
        assert np.array_equal(text_a, text_b)
        np.testing.assert_allclose(pcm_a, pcm_b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pinned", [False, True], ids=["plain", "pinned"])
@torch.inference_mode()
def test_the_prefix_route_compiled_and_graphed_equals_masked_attention_with_7b_heads(pinned):
    """`prefix_attention` compiled (Triton's flex decoding, with the log-sum-exp merge when
    pinned) inside a CUDA graph, replayed as the slots' rings fill, equals the masked path of
    the same bf16 inputs (to bf16 rounding): 32 heads of 128 over a 3,000-entry ring."""
    from benchmarks.attention import masked
    from personaplex.model.attention import prefix_attention, prefix_mask

    B, H, C, D = 8, 32, 3000, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, q_pinned, keys, values = (torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16)
                                 for shape in [(B, H, 1, D)] * 2 + [(B, H, C, D)] * 2)
    lengths = torch.ones(B, dtype=torch.long, device="cuda")
    prompt = torch.tensor([0, 1, 60, 127, 128, 129, 500, 0], device="cuda") if pinned else None
    attend = torch.compile(prefix_attention, fullgraph=True, dynamic=False)

    def tick() -> torch.Tensor:
        ours = torch.minimum(prompt, lengths) if prompt is not None else None
        return attend(q, q_pinned if pinned else None, keys, values, prefix_mask(lengths, C, ours))

    tick()  # compiles
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        tick()
        with torch.cuda.graph(graph):
            out = tick()
    torch.cuda.current_stream().wait_stream(stream)
    for filled in ([1] * B, [1, 2, 127, 128, 129, 1000, 2999, 3000], [3000] * B):
        lengths.copy_(torch.tensor(filled))
        graph.replay()
        ours = torch.minimum(prompt, lengths) if prompt is not None else None
        expected = masked(q.float(), q_pinned.float() if pinned else None, keys.float(), values.float(), lengths, ours)
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
