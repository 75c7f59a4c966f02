"""Invariants: streaming equals whole-sequence, causality, reset isolation, prefill equals stepping,
batched equals alone."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from personaplex.model.config import FRAME_SIZE, SamplingParams
from personaplex.model.lm import LMModel
from personaplex.model.loading import load_strict
from personaplex.model.streaming import reset_slots, slot_mask, streaming
from personaplex.runtime.engine import Engine

from .helpers import CHECKPOINT, noise_pcm, user_audio

LONG_FRAMES = 140  # 280 encoder steps: past Mimi's 250-step window and its 251-entry ring


@torch.inference_mode()
def test_mimi_streaming_equals_whole_clip_past_the_attention_window(models):
    mimi = models.mimi
    pcm = noise_pcm(LONG_FRAMES).view(1, 1, -1)
    whole_latent = mimi.encode_latent(pcm)
    whole_codes = mimi.encode(pcm)
    with streaming(mimi, 1):
        chunks = [pcm[..., i * FRAME_SIZE : (i + 1) * FRAME_SIZE] for i in range(LONG_FRAMES)]
        stream_latent = torch.cat([mimi.encode_latent(c) for c in chunks], dim=-1)
    with streaming(mimi, 1):
        stream_codes = torch.cat([mimi.encode(c) for c in chunks], dim=-1)
    torch.testing.assert_close(stream_latent, whole_latent, atol=1e-5, rtol=0)
    assert torch.equal(stream_codes, whole_codes)
    whole_pcm = mimi.decode(whole_codes)
    with streaming(mimi, 1):
        stream_pcm = torch.cat([mimi.decode(whole_codes[..., i : i + 1]) for i in range(LONG_FRAMES)], dim=-1)
    torch.testing.assert_close(stream_pcm, whole_pcm, atol=1e-5, rtol=0)


@torch.inference_mode()
def test_mimi_is_causal(models):
    pcm = noise_pcm(12).view(1, 1, -1)
    changed = pcm.clone()
    changed[..., 7 * FRAME_SIZE :] = torch.randn(5 * FRAME_SIZE)
    a, b = models.mimi.encode(pcm), models.mimi.encode(changed)
    assert torch.equal(a[..., :7], b[..., :7]) and not torch.equal(a, b)
    pa, pb = models.mimi.decode(a), models.mimi.decode(b)
    assert torch.equal(pa[..., : 7 * FRAME_SIZE], pb[..., : 7 * FRAME_SIZE])


@torch.inference_mode()
def test_mimi_reset_slot_is_a_fresh_stream_and_leaves_other_slots_alone(models):
    mimi = models.mimi
    a, b = noise_pcm(6, seed=1).view(1, 1, -1), noise_pcm(6, seed=2).view(1, 1, -1)
    with streaming(mimi, 1):
        fresh_b = torch.cat([mimi.encode(b[..., i * FRAME_SIZE : (i + 1) * FRAME_SIZE]) for i in range(6)], -1)
    with streaming(mimi, 1):
        alone_a = torch.cat([mimi.encode(a[..., i * FRAME_SIZE : (i + 1) * FRAME_SIZE]) for i in range(6)], -1)
    with streaming(mimi, 2):
        out = []
        for i in range(6):
            if i == 3:
                reset_slots(mimi, slot_mask(2, 1, torch.device("cpu")))
            src_b = b if i >= 3 else a
            j = i - 3 if i >= 3 else i
            frame = torch.cat([a[..., i * FRAME_SIZE : (i + 1) * FRAME_SIZE], src_b[..., j * FRAME_SIZE : (j + 1) * FRAME_SIZE]])
            out.append(mimi.encode(frame))
        out = torch.cat(out, dim=-1)
    assert torch.equal(out[0], alone_a[0])
    assert torch.equal(out[1, :, 3:], fresh_b[0, :, :3])


def small_context_lm(context: int) -> LMModel:
    """The golden weights in a model whose attention window is only `context` steps."""
    from personaplex.model.config import TINY

    with torch.device("meta"):
        lm = LMModel(dataclasses.replace(TINY.lm, context=context))
    load_strict(lm, {k: v.float() for k, v in load_file(str(CHECKPOINT / "model.safetensors")).items()}, "tiny")
    return lm.eval()


def random_tokens(cfg, steps: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.card, (1, cfg.num_streams, steps), generator=g)
    tokens[:, 0] = torch.randint(0, cfg.text_card, (1, steps), generator=g)
    return tokens


@pytest.mark.parametrize("chunk", [1, 3, 11])
@torch.inference_mode()
def test_lm_streaming_equals_whole_sequence_past_a_ring_wrap(chunk):
    lm = small_context_lm(context=8)
    tokens = random_tokens(lm.cfg, 33)
    whole = lm.forward_embeddings(lm.embed(tokens))
    with streaming(lm, 1):
        parts = [lm.forward_embeddings(lm.embed(tokens[..., i : i + chunk])) for i in range(0, 33, chunk)]
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=1e-5, rtol=0)


@torch.inference_mode()
def test_lm_is_causal_and_windowed():
    lm = small_context_lm(context=8)
    tokens = random_tokens(lm.cfg, 20)
    changed = tokens.clone()
    changed[..., 12:] = random_tokens(lm.cfg, 8, seed=5)
    a, b = lm.forward_embeddings(lm.embed(tokens)), lm.forward_embeddings(lm.embed(changed))
    assert torch.equal(a[:, :12], b[:, :12]) and not torch.allclose(a[:, 12:], b[:, 12:])
    # Two layers of an 8-step window see 14 steps back at most: step 19 ignores steps 0..4.
    early = tokens.clone()
    early[..., :5] = random_tokens(lm.cfg, 5, seed=6)
    c = lm.forward_embeddings(lm.embed(early))
    torch.testing.assert_close(c[:, 19], a[:, 19], atol=1e-6, rtol=0)


def whole_depformer_logits(lm: LMModel, h: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
    """All depformer steps of one frame in one causal pass (the reference's training path)."""
    x = torch.stack(
        [lm.depformer_in[s](h) + (lm.depformer_text_emb if s == 0 else lm.depformer_emb[s - 1])(inputs[s]) for s in range(len(inputs))],
        dim=1,
    )  # [B, S, D]
    B, S, D = x.shape
    for layer in lm.depformer.layers:
        attn = layer.self_attn
        y = layer.norm1(x)
        qkv = torch.stack([attn.in_projs[s](y[:, s]) for s in range(S)], 1)
        q, k, v = qkv.view(B, S, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, S, D)
        x = x + torch.stack([attn.out_projs[s](o[:, s]) for s in range(S)], 1)
        y = layer.norm2(x)
        x = x + torch.stack([layer.gating[s](y[:, s]) for s in range(S)], 1)
    return torch.stack([lm.linears[s](x[:, s]) for s in range(S)], 1)


@torch.inference_mode()
def test_depformer_steps_equal_the_whole_pass_at_every_step(models, expected):
    lm = models.lm
    h = lm.forward_embeddings(lm.embed(expected["lm_input"][None]))[0, -1:]
    inputs = [expected["lm_input"][0, -1:]] + [expected["dep_forced_tokens"][s : s + 1] for s in range(15)]
    cache = lm.new_depformer_cache(1, 16)
    stepped = torch.stack([lm.depformer_step(s, inputs[s], h, cache) for s in range(16)], 1)
    torch.testing.assert_close(stepped, whole_depformer_logits(lm, h, inputs), atol=1e-5, rtol=0)


@torch.inference_mode()
def test_prefill_leaves_the_state_stepping_leaves(models, expected_json):
    states = []
    for prefill in (False, True):
        engine = Engine(models, num_slots=2)
        voice = engine.voice("TESTV0")
        engine.start(1, engine.prompt(voice, expected_json["text_prompt"]), SamplingParams(greedy=True), prefill=prefill)
        ring = engine.gen.ring
        kv = [(layer.self_attn.state.keys[1].clone(), layer.self_attn.state.values[1].clone()) for layer in models.lm.transformer.layers]
        states.append((ring.cache[1].clone(), ring.provided[1].clone(), int(ring.offset[1]), int(models.lm.transformer.state.offset[1]), kv))
        frames = [engine.step(torch.stack([torch.zeros(FRAME_SIZE), f])).tokens[1] for f in user_audio(8, 3)]
        states[-1] += (torch.stack(frames),)
    (c0, p0, o0, t0, kv0, f0), (c1, p1, o1, t1, kv1, f1) = states
    assert torch.equal(c0, c1) and torch.equal(p0, p1) and o0 == o1 and t0 == t1
    for (k0, v0), (k1, v1) in zip(kv0, kv1):
        torch.testing.assert_close(k1[:, :t0], k0[:, :t0], atol=1e-5, rtol=0)
        torch.testing.assert_close(v1[:, :t0], v0[:, :t0], atol=1e-5, rtol=0)
    assert torch.equal(f0, f1)


def solo_run(models, voice_name: str, role: str, sampling: SamplingParams, audio: list[torch.Tensor]) -> torch.Tensor:
    engine = Engine(models, num_slots=1)
    engine.start(0, engine.prompt(engine.voice(voice_name), role), sampling)
    return torch.stack([engine.step(frame[None]).tokens[0] for frame in audio])


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
@torch.inference_mode()
def test_batched_sessions_get_exactly_what_they_get_alone(models, greedy):
    """Three slots; sessions join at different ticks, one leaves and a new one takes its slot."""
    sessions = {  # name: (slot, first tick, last tick, role, seed)
        "a": (0, 0, 14, "You enjoy having a good conversation.", 11),
        "b": (1, 3, 14, "", 22),
        "c": (2, 0, 6, "You work for a bank and your name is Ann.", 33),
        "d": (2, 8, 14, "You are a wise and friendly teacher.", 44),
    }
    audio = {name: user_audio(15, seed=i + 10) for i, name in enumerate(sessions)}
    params = {name: SamplingParams(greedy=greedy, seed=s[4]) for name, s in sessions.items()}
    engine = Engine(models, num_slots=3)
    got: dict[str, list[torch.Tensor]] = {name: [] for name in sessions}
    for tick in range(15):
        for name, (slot, first, _, role, _) in sessions.items():
            if tick == first:
                engine.start(slot, engine.prompt(engine.voice("TESTV0"), role), params[name])
        batch = torch.zeros(3, FRAME_SIZE)
        live = {name: s for name, s in sessions.items() if s[1] <= tick <= s[2]}
        for name, (slot, first, *_rest) in live.items():
            batch[slot] = audio[name][tick - first]
        out = engine.step(batch)
        for name, (slot, *_rest) in live.items():
            got[name].append(out.tokens[slot])
    for name, (_, first, last, role, _) in sessions.items():
        alone = solo_run(models, "TESTV0", role, params[name], audio[name][: last - first + 1])
        assert torch.equal(torch.stack(got[name]), alone), name


@torch.inference_mode()
def test_graph_plumbing_gives_what_the_plain_step_gives(models):
    """The CUDA-graph path (static buffers per bucket, capture before any session, slots reset
    after it) emulated on CPU: a session in a graphed engine gets the plain engine's tokens, also
    when some of its frames run with the graphs set aside (`without_graphs`, as the benchmark does)."""
    runs = []
    for graphs in (False, True):
        engine = Engine(models, num_slots=4, cuda_graphs=graphs)
        engine.start(2, engine.prompt(engine.voice("TESTV0"), "You enjoy having a good conversation."), SamplingParams(seed=3))
        tokens = []
        for i, frame in enumerate(user_audio(8, seed=21)):
            batch = torch.zeros(4, FRAME_SIZE)
            batch[2] = frame
            with engine.without_graphs() if graphs and i % 2 else contextlib.nullcontext():
                tokens.append(engine.step(batch, bucket=engine.bucket_for(3)).tokens[2].clone())
        assert engine.cuda_graphs is graphs  # given back after each block
        runs.append(torch.stack(tokens))
    assert torch.equal(runs[0], runs[1])


def test_a_failed_graph_capture_falls_back_to_plain_steps(models, monkeypatch):
    from personaplex.runtime import graphs

    def broken(self, buckets):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs.StepGraphs, "capture", broken)
    engine = Engine(models, num_slots=2, cuda_graphs=True)
    assert not engine.cuda_graphs and "operation not permitted when stream is capturing" in engine.graphs_failed
    engine.start(0, engine.prompt(engine.voice("TESTV0"), ""), SamplingParams(greedy=True))
    assert engine.step(torch.zeros(1, FRAME_SIZE), bucket=1).pcm.shape == (1, FRAME_SIZE)


def _engine_state(engine: Engine, slot: int, upto: int):
    ring = engine.gen.ring
    kv = [(layer.self_attn.state.keys[slot, :, :upto].clone(), layer.self_attn.state.values[slot, :, :upto].clone())
          for layer in engine.models.lm.transformer.layers]
    return ring.cache[slot].clone(), ring.provided[slot].clone(), int(ring.offset[slot]), kv


@torch.inference_mode()
def test_a_prefill_in_pieces_leaves_the_state_one_prefill_leaves_and_other_slots_keep_talking(models, expected_json):
    """The pieces run in states of their own while the engine steps every slot in between;
    slot 0's conversation is what it is alone, and slot 1 starts as after one prefill."""
    role, sampling = expected_json["text_prompt"], SamplingParams(greedy=True)
    audio_0, audio_1 = user_audio(24, seed=5), user_audio(6, seed=7)
    alone_0 = solo_run(models, "TESTV0", "", sampling, audio_0)
    alone_1 = solo_run(models, "TESTV0", role, sampling, audio_1)
    whole = Engine(models, num_slots=2)
    whole.start(1, whole.prompt(whole.voice("TESTV0"), role), sampling)
    filled = int(models.lm.transformer.state.offset[1])
    want = _engine_state(whole, 1, filled)

    engine = Engine(models, num_slots=2)  # takes over the models' streaming state
    engine.start(0, engine.prompt(engine.voice("TESTV0"), ""), sampling)
    pieces = engine.start_pieces(1, engine.prepare(engine.prompt(engine.voice("TESTV0"), role)), sampling, frames=7)
    got_0, ticks = [], iter(audio_0)
    while True:  # a tick (slot 1 hears silence meanwhile), then a piece, until the prefill is done
        got_0.append(engine.step(torch.stack([next(ticks), torch.zeros(FRAME_SIZE)])).tokens[0])
        if next(pieces, "done") == "done":
            break
    assert len(got_0) == -(-filled // 7) >= 3  # one tick before each of the prefill's pieces
    ring, provided, offset, kv = _engine_state(engine, 1, filled)
    assert torch.equal(ring, want[0]) and torch.equal(provided, want[1]) and offset == want[2]
    for (k, v), (wk, wv) in zip(kv, want[3]):
        torch.testing.assert_close(k, wk, atol=1e-5, rtol=0)
        torch.testing.assert_close(v, wv, atol=1e-5, rtol=0)
    got_1 = []
    for f1 in audio_1:
        out = engine.step(torch.stack([next(ticks), f1]))
        got_0.append(out.tokens[0])
        got_1.append(out.tokens[1])
    assert torch.equal(torch.stack(got_1), alone_1)
    assert torch.equal(torch.stack(got_0), alone_0[: len(got_0)])


@torch.inference_mode()
def test_a_conversation_moved_to_another_slot_goes_on_as_if_it_had_stayed(models):
    sampling = SamplingParams(seed=9)  # sampled: the random stream is the slot's own, and moves with it
    audio = user_audio(12, seed=6)
    engine = Engine(models, num_slots=3)
    engine.start(2, engine.prompt(engine.voice("TESTV0"), "You enjoy having a good conversation."), sampling)
    got = []
    for i, f in enumerate(audio):
        if i == 5:
            engine.move(2, 0)
        slot = 2 if i < 5 else 0
        batch = torch.zeros(3, FRAME_SIZE)
        batch[slot] = f
        out = engine.step(batch)
        got.append(out.tokens[slot])
    assert torch.equal(torch.stack(got), solo_run(models, "TESTV0", "You enjoy having a good conversation.", sampling, audio))


@torch.inference_mode()
def test_a_voice_encoded_in_pieces_has_the_whole_clips_codes(models):
    from personaplex.model.persona import voice_frames
    from personaplex.model.streaming import detached
    from personaplex.runtime.audio import normalize_loudness, read_audio

    from .helpers import ROOT

    clip = normalize_loudness(read_audio(ROOT / "examples" / "voice_sample.wav"))
    engine = Engine(models, num_slots=1)
    pieces = engine.voice_pieces(clip, frames=3)
    n = 0
    while True:
        try:
            next(pieces)
            n += 1
        except StopIteration as done:
            voice = done.value
            break
    with detached(models.mimi):
        whole = models.mimi.encode(voice_frames(torch.from_numpy(clip)))[0]
    assert n == -(-whole.shape[1] // 3) and torch.equal(voice.codes, whole)
