"""Eight bits: the LM's weights in int8 or fp8 (w8a16) and its KV cache in fp8, on the tiny checkpoint.

What they cost in quality is measured by `benchmarks.quality` (the same tokens through each model,
against float32) and held to the issue's bounds; the cache keeps the engine's invariants
(batched equals alone, prefill equals stepping, the prefix route equals the masked one); the
bytes are counted from what the engine holds; and an app started in 8 bits serves a WebRTC call
and an `/api/chat` call on a compiled engine, past its window with the persona kept."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
import torch

from personaplex.model.config import TINY, SamplingParams
from personaplex.model.formats import Embedding8, Linear8, compute_dtype, quantize, weight_bytes, weight_bytes_as
from personaplex.model.kv_cache import from_fp8, to_fp8
from personaplex.model.lm import LMModel
from personaplex.model.loading import load_models, resolve_checkpoint
from personaplex.runtime.capacity import check_formats, lm_weight_bytes, slot_bytes
from personaplex.runtime.engine import Engine

from .helpers import CHECKPOINT, ROOT, TINY_CONFIG, RunningApp, noise_pcm

QUALITY = ["--checkpoint", str(CHECKPOINT), "--config", str(TINY_CONFIG), "--input-wav", str(ROOT / "examples" / "user_question.wav"),
           "--voice", "TESTV0", "--device", "cpu"]


# --- the formats themselves ------------------------------------------------------------------
@pytest.mark.parametrize(("name", "bound"), [("int8", 0.01), ("fp8", 0.03)])
def test_an_8_bit_linear_and_embedding_compute_what_the_full_width_ones_do(name, bound):
    g = torch.Generator().manual_seed(0)
    linear, embedding = torch.nn.Linear(64, 48, bias=False), torch.nn.Embedding(100, 32)
    for module in (linear, embedding):
        torch.nn.init.normal_(module.weight, generator=g)
    root = torch.nn.Sequential(linear, embedding)
    x, ids = torch.randn(5, 64, generator=g), torch.randint(0, 100, (7,), generator=g)
    want_x, want_ids = linear(x), embedding(ids)
    quantize(root, name)
    assert isinstance(root[0], Linear8) and isinstance(root[1], Embedding8) and compute_dtype(root[0]) == torch.float32
    assert (root[0](x) - want_x).norm() / want_x.norm() < bound
    assert (root[1](ids) - want_ids).norm() / want_ids.norm() < bound


def test_bytes_are_counted_from_what_is_held_and_estimated_exactly_before_loading():
    for name in ("bf16", "int8", "fp8"):
        models = load_models(resolve_checkpoint(CHECKPOINT), TINY, "cpu", torch.bfloat16, weights=name)
        assert weight_bytes(models.lm) == lm_weight_bytes(TINY, name) and models.weights == name
    with torch.device("meta"):
        lm = LMModel(TINY.lm).to(torch.bfloat16)
    assert weight_bytes_as(lm, "int8") < 0.6 * weight_bytes(lm)
    assert slot_bytes(TINY, "fp8", torch.bfloat16) < slot_bytes(TINY, "bf16", torch.bfloat16)


def test_a_vector_in_the_fp8_cache_keeps_its_range_and_a_zero_vector_stays_zero():
    x = torch.tensor([[1e4, -3.0, 0.5, 7e-5], [0.0, 0.0, 0.0, 0.0], [2e-6, 1e-6, -3e-6, 0.0]])
    q, e = to_fp8(x)
    back = from_fp8(q, e, torch.float32)
    assert torch.all((back - x).abs() <= 0.07 * x.abs().amax(dim=-1, keepdim=True))  # e4m3: 3 bits of mantissa
    assert torch.equal(back[1], torch.zeros(4)) and torch.isfinite(back).all()


def test_a_format_this_build_cannot_run_is_refused_in_one_line():
    from personaplex.errors import SettingsError

    with pytest.raises(SettingsError, match="unknown weight format 'int4': use one of auto, bf16, int8, fp8"):
        check_formats(torch.device("cpu"), "int4", "bf16")
    with pytest.raises(SettingsError, match="unknown KV cache format 'int8': use one of bf16, fp8"):
        check_formats(torch.device("cpu"), "int8", "int8")
    bad = subprocess.run([sys.executable, "app.py", "--weights", "int4"], cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid choice: 'int4'" in bad.stderr
    env = {**os.environ, "PERSONAPLEX_KV_CACHE": "int8"}
    bad = subprocess.run([sys.executable, "app.py"], cwd=str(ROOT), capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "PERSONAPLEX_KV_CACHE='int8': use one of bf16, fp8" in bad.stderr


# --- quality and bytes, measured -------------------------------------------------------------
@pytest.mark.parametrize(("weights", "kv_cache", "room"), [("int8", "bf16", 0.03), ("fp8", "bf16", 0.03),
                                                          ("int8", "fp8", 0.06), ("fp8", "fp8", 0.06)])
def test_8_bit_weights_agree_with_full_precision_nearly_as_well_as_bf16(weights, kv_cache, room, capsys):
    from benchmarks.quality import main

    assert main([*QUALITY, "--weights", weights, "--kv-cache", kv_cache]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["frames"] > 50 and (got["weights"], got["kv_cache"]) == (weights, kv_cache)
    for key in ("text_top1", "audio_top1"):
        assert got[key] >= got["bf16"][key] - room, (key, got)
    assert got["logits_cosine"] > 0.99
    assert got["lm_weight_bytes"] <= 0.6 * got["lm_weight_bytes_bf16"]
    if kv_cache == "fp8":
        assert got["kv_bytes_per_slot"] <= 0.55 * got["kv_bytes_per_slot_bf16"]


# --- the fp8 cache keeps the engine's invariants ---------------------------------------------
@pytest.fixture(scope="module")
def int8_models():
    return load_models(resolve_checkpoint(CHECKPOINT), TINY, "cpu", torch.float32, weights="int8")


def run(engine: Engine, slots: list[int], frames: int = 30, prefill: bool = True) -> list[torch.Tensor]:
    """Greedy tokens of each of `slots` (started with its own seed and role) over `frames` frames."""
    prompts = {slot: engine.prompt(engine.voice("TESTV0"), f"role {slot}") for slot in slots}
    for slot in slots:
        engine.start(slot, prompts[slot], SamplingParams(greedy=True), prefill=prefill, keep_persona=True)
    pcm = {slot: noise_pcm(frames, seed=slot) for slot in slots}
    out = {slot: [] for slot in slots}
    for f in range(frames):
        batch = torch.zeros(engine.num_slots, 1920)
        for slot in slots:
            batch[slot] = pcm[slot][f * 1920 : (f + 1) * 1920]
        frame = engine.step(batch)
        for slot in slots:
            out[slot].append(frame.tokens[slot].clone())
    return [torch.stack(out[slot]) for slot in slots]


@torch.inference_mode()
def test_with_the_fp8_cache_batched_equals_alone_and_prefill_equals_stepping(int8_models):
    batched = run(Engine(int8_models, num_slots=3, pinning=True, kv_cache="fp8"), [0, 2])
    for slot, tokens in zip([0, 2], batched, strict=True):
        alone = run(Engine(int8_models, num_slots=3, pinning=True, kv_cache="fp8"), [slot])[0]
        assert torch.equal(tokens, alone)
    stepped = run(Engine(int8_models, num_slots=1, pinning=True, kv_cache="fp8"), [0], prefill=False)[0]
    assert torch.equal(stepped, batched[0])


@pytest.mark.parametrize("route", [{"cuda_graphs": True}, {"prefix_attention": True}], ids=["graph-plumbing", "prefix-route"])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@torch.inference_mode()
def test_with_the_fp8_cache_each_route_of_the_tick_gives_the_plain_tokens(int8_models, route):
    """Through `StepGraphs` (emulated without CUDA: the same static buffers and replays), and on
    the prefix route (flex attention over what each slot holds), against the plain masked tick."""
    plain = run(Engine(int8_models, num_slots=2, pinning=True, kv_cache="fp8", cuda_graphs=False, prefix_attention=False), [0, 1])
    other = run(Engine(int8_models, num_slots=2, pinning=True, kv_cache="fp8", **{"cuda_graphs": False, **route}), [0, 1])
    for a, b in zip(plain, other, strict=True):
        assert torch.equal(a, b)


# --- the app, in 8 bits ----------------------------------------------------------------------
@pytest.fixture(scope="module", params=["eager", "compiled"])
def app_in_8_bits(request, tmp_path_factory):
    """The app with int8 weights and the fp8 cache, eager and compiled, with a window of 140
    frames: a call passes it after a few seconds, and keeps its persona (the prompt is about 100
    frames)."""
    config = json.loads(TINY_CONFIG.read_text())
    config["lm"]["context"] = 140
    short = tmp_path_factory.mktemp("config") / "short_context.json"
    short.write_text(json.dumps(config))
    compile_env = {"PERSONAPLEX_COMPILE": "1" if request.param == "compiled" else "0"}
    app = RunningApp("--weights", "int8", "--kv-cache", "fp8", "--config", str(short), env=compile_env)
    try:
        app.wait_ready(timeout=600)
        yield app, request.param
    finally:
        app.stop()


def test_an_app_in_8_bits_serves_both_doors_past_its_window(app_in_8_bits, client, speech):
    from examples.chat_client import talk

    app, mode = app_in_8_bits
    assert "int8 weights, fp8 KV cache" in app.output()
    ws_url = app.url.replace("http://", "ws://") + "/api/chat"

    async def both():
        return await asyncio.gather(client.converse(app.url, speech, 10.0, {"voice": "TESTV0"}),
                                    talk(ws_url, {"voice_prompt": "TESTV0.pt"}, speech[::2].copy(), 10.0))

    webrtc, ws = asyncio.run(both())
    assert webrtc.ended is None and webrtc.audio.size / client.RATE > 8.5  # audio for the whole call
    assert "full since" in webrtc.details and "the persona" in webrtc.details  # past the window, the persona kept
    assert ws.error is None and ws.seconds > 9.0 and "".join(ws.text).strip()
    compiled = "compiling the engine's step" in app.output()
    assert compiled == (mode == "compiled") and "uncompiled" not in app.output()  # as asked, and it worked


# --- what fits, and what auto takes --------------------------------------------------------
def gpu(monkeypatch, free_gib: float, capability: tuple[int, int] = (9, 0)) -> torch.device:
    """A CUDA device as the capacity arithmetic sees it (no GPU needed)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * 2**30), int(free_gib * 2**30)))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "A10G")
    return torch.device("cuda")


def test_auto_takes_bf16_where_8_conversations_fit_beside_it_else_int8(monkeypatch):
    from personaplex.model.config import PERSONAPLEX_7B
    from personaplex.runtime.capacity import choose_weights

    assert choose_weights(PERSONAPLEX_7B, gpu(monkeypatch, 78.7), "bf16", "auto")[0] == "bf16"
    weights, why = choose_weights(PERSONAPLEX_7B, gpu(monkeypatch, 21.9), "bf16", "auto")
    assert weights == "int8" and "fewer than 8" in why
    assert choose_weights(PERSONAPLEX_7B, gpu(monkeypatch, 21.9), "bf16", "fp8") == ("fp8", "")  # asked: taken as asked
    assert choose_weights(PERSONAPLEX_7B, torch.device("cpu"), "bf16", "auto")[0] == "bf16"


def test_the_7b_in_bf16_is_refused_on_a_16_gb_card_with_what_to_use_and_fits_in_8_bits(monkeypatch):
    from personaplex.model.config import PERSONAPLEX_7B
    from personaplex.model.loading import CheckpointError
    from personaplex.runtime.capacity import check_room

    with pytest.raises(CheckpointError, match="--weights int8 halves the weights"):
        check_room(PERSONAPLEX_7B, gpu(monkeypatch, 14.6), cpu_asked=False, weights="bf16")
    check_room(PERSONAPLEX_7B, gpu(monkeypatch, 14.6), cpu_asked=False, weights="int8", kv_cache="fp8")


def test_fp8_is_refused_where_the_gpu_has_no_float8(monkeypatch):
    from personaplex.errors import SettingsError

    with pytest.raises(SettingsError, match=r"fp8 needs a GPU of compute capability 8\.9.*this A10G is 8\.6: use --weights int8"):
        check_formats(gpu(monkeypatch, 21.9, capability=(8, 6)), "int8", "fp8")
    check_formats(gpu(monkeypatch, 21.9, capability=(8, 6)), "int8", "bf16")
    check_formats(gpu(monkeypatch, 21.9, capability=(8, 9)), "fp8", "fp8")
