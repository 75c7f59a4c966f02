"""The tick compiled (`Engine(compile=True)`, the default on CUDA: Mimi's frame encode and
decode, the temporal layers, the text sampling with the depformer) equals the eager tick:
greedy tokens in float32 on the tiny checkpoint, and the audio to float rounding, across
buckets, with and without a pinned persona; each piece is one graph for every bucket, and a
failing flex kernel recompiles only the layers; the op counter counts its kernels. Compiled on
the CPU here (Inductor's C++)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.ops import count_tick, kernel_profile
from personaplex.model import transformer as transformer_module
from personaplex.model.config import FRAME_SIZE, SamplingParams
from personaplex.runtime import batch_graphs
from personaplex.runtime.engine import Engine

ROLE = "You enjoy having a good conversation."
STEPS = 24


PIECES = 4  # compiled: Mimi's encode, a temporal layer, the heads, Mimi's decode


def graphs_made() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def session(models, compile: bool) -> tuple[Engine, list[tuple[torch.Tensor, torch.Tensor]]]:
    before = graphs_made()
    with kernel_profile():
        engine = Engine(models, num_slots=4, pinning=True, compile=compile)
    assert engine.compiled is compile and engine.compile_failed is None
    if compile:  # one graph per piece serves every bucket; a lone call ticks at 2
        assert engine.buckets() == [2, 4] and graphs_made() - before == PIECES
    prompt = engine.prompt(engine.voice("TESTV0"), ROLE)
    engine.start(0, prompt, SamplingParams(greedy=True), keep_persona=True)
    engine.start(1, prompt, SamplingParams(greedy=True, seed=3))
    g = torch.Generator().manual_seed(0)
    outputs = []
    for i in range(STEPS):
        bucket = 2 << i % 2  # both buckets: the idle slots 2 and 3 step in bucket 4 only
        frame = engine.step(0.1 * torch.randn(bucket, FRAME_SIZE, generator=g), bucket)
        outputs.append((frame.tokens.clone(), frame.pcm.clone()))
    if compile:  # ticks from tensors made outside inference mode, as the engine thread's: no new graph
        assert graphs_made() - before == PIECES
    return engine, outputs


@pytest.fixture(scope="module")
def both(models):
    _, eager = session(models, compile=False)
    compiled, tokens = session(models, compile=True)
    yield compiled, eager, tokens
    compiled.compile_steps(False)


def test_the_compiled_tick_gives_the_eager_tokens_and_audio(both):
    _, eager, compiled = both
    for (tokens_a, pcm_a), (tokens_b, pcm_b) in zip(eager, compiled, strict=True):
        assert torch.equal(tokens_a, tokens_b)
        torch.testing.assert_close(pcm_b, pcm_a, atol=1e-4, rtol=0)


def test_the_op_counter_sees_the_generated_kernels_and_fewer_operations(both, models):
    engine, _, _ = both
    compiled = count_tick(engine, 2)
    engine.compile_steps(False)
    eager = count_tick(engine, 2)
    engine.compile_steps(True)
    assert compiled.ops["generated kernel"] > 0 and "generated kernel" not in eager.ops
    assert compiled.total < eager.total and compiled.host_syncs == eager.host_syncs == 0


def test_a_failed_compile_leaves_an_eager_engine_that_says_why(models, monkeypatch):
    def broken(fn, **_):
        def run(*args, **kwargs):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(batch_graphs.torch, "compile", broken)
    engine = Engine(models, num_slots=1, compile=True)
    assert not engine.compiled and "no C++ compiler" in (engine.compile_failed or "")
    assert "no C++ compiler" in (engine.prefix_attention_failed or "")  # tried again without flex attention first
    engine.start(0, engine.prompt(engine.voice("TESTV0"), ROLE), SamplingParams(greedy=True))
    assert engine.step(torch.zeros(1, FRAME_SIZE)).tokens.shape[0] == 1


def test_a_failing_flex_kernel_leaves_a_compiled_engine_with_masked_attention(models, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no flex kernel for this device")

    compiled, compile = [], torch.compile

    def spy(fn, **kwargs):
        compiled.append(fn.__name__)
        return compile(fn, **kwargs)

    monkeypatch.setattr(transformer_module, "prefix_attention", broken)
    monkeypatch.setattr(torch, "compile", spy)
    engine = Engine(models, num_slots=2, compile=True)
    try:
        assert engine.compiled and engine.compile_failed is None and engine.every_batch_failed is None
        assert "no flex kernel" in (engine.prefix_attention_failed or "")
        assert sorted(compiled) == ["decode", "encode", "heads", "run_layer", "run_layer"]  # only the layers again
        assert not engine.prefix_attention
        engine.start(0, engine.prompt(engine.voice("TESTV0"), ROLE), SamplingParams(greedy=True))
        assert engine.step(torch.zeros(2, FRAME_SIZE)).tokens.shape[0] == 2
    finally:
        engine.compile_steps(False)


def test_when_one_graph_for_every_bucket_fails_each_bucket_gets_its_own(models, monkeypatch):
    def broken(found):
        raise RuntimeError("no dynamic shapes here")

    monkeypatch.setattr(batch_graphs, "mark_slots", broken)
    engine = Engine(models, num_slots=2, compile=True)
    try:
        assert engine.compiled and engine.compile_failed is None and engine.prefix_attention_failed is None
        assert "no dynamic shapes here" in (engine.every_batch_failed or "") and engine.buckets() == [2]
        engine.start(0, engine.prompt(engine.voice("TESTV0"), ROLE), SamplingParams(greedy=True))
        assert engine.step(torch.zeros(2, FRAME_SIZE)).tokens.shape[0] == 2
    finally:
        engine.compile_steps(False)
