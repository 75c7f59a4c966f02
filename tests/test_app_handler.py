"""The fastrtc handler of app.py on the tiny checkpoint: framing, silence while the prompt
loads, bounded queues, refusals with messages, slots freed on shutdown and by the watchdog."""

from __future__ import annotations

import asyncio
import re
import threading
import wave
from pathlib import Path

import numpy as np
import pytest
from fastrtc import AdditionalOutputs, CloseStream

import app
from personaplex.config import SAMPLE_RATE

from .helpers import start_tiny_service

CHUNK = 960  # what fastrtc hands `receive` at 24 kHz: 40 ms


@pytest.fixture(scope="module")
def service():
    svc = start_tiny_service(max_sessions=2)
    yield svc
    svc.worker.stop()


def make_handler(service, role="You enjoy having a good conversation.", voice="TESTV0", key="call-1"):
    handler = app.ConversationHandler(service, app.Recordings())
    handler.phone_mode = True  # `wait_for_args` returns at once; the inputs are set as Gradio sets them
    handler.latest_args = ["__webrtc_value__", key, role, voice, "", False, 0.7, 25, 0.8, 250, 1, True]
    return handler


def mic_chunks(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = np.arange(n * CHUNK) / SAMPLE_RATE
    pcm = (0.3 * np.sin(2 * np.pi * 300 * t) + 0.02 * rng.standard_normal(t.size)) * 32767
    return [(SAMPLE_RATE, pcm[i * CHUNK : (i + 1) * CHUNK].astype(np.int16)[None]) for i in range(n)]


def audio_of(item):
    """(rate, int16 [1, N]) of an emitted item, or None when it carries no audio."""
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], AdditionalOutputs):
        item = item[0]
    return item if isinstance(item, tuple) and isinstance(item[1], np.ndarray) else None


async def next_audio(handler, timeout=5.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        item = await handler.emit()
        if audio_of(item) is not None:
            return item
    raise AssertionError("no audio frame came out")


def test_every_80_ms_in_gives_80_ms_out_with_silence_while_the_prompt_loads(service):
    async def scenario():
        handler = make_handler(service)
        gate = threading.Event()
        service.worker.call(gate.wait)  # hold the engine: the prompt cannot run yet
        await handler.start_up()
        chunks = mic_chunks(24)
        for chunk in chunks[:4]:
            await handler.receive(chunk)
        early = [audio_of(await next_audio(handler)) for _ in range(2)]
        assert all(rate == SAMPLE_RATE and pcm.shape == (1, 1920) and not pcm.any() for rate, pcm in early)
        gate.set()
        assert await asyncio.to_thread(handler.session.ready.wait, 10)
        outputs, texts = [], []
        for i in range(4, 24, 2):
            await handler.receive(chunks[i])
            await handler.receive(chunks[i + 1])
            item = await next_audio(handler)
            outputs.append(audio_of(item))
            if isinstance(item[1], AdditionalOutputs):
                texts.append(item[1].args[0])
        assert len(outputs) == 10 and all(rate == SAMPLE_RATE and pcm.shape == (1, 1920) for rate, pcm in outputs)
        assert any(pcm.any() for _, pcm in outputs)
        assert texts and texts[-1]  # the (random) tiny model always says something
        await handler.shutdown()
        return handler

    handler = asyncio.run(scenario())
    call = handler.recordings.get("call-1")
    assert call is not None and len(call.agent) == 10
    wav_path, _text_path = app.call_files(call)
    with wave.open(wav_path) as w:
        assert (w.getnchannels(), w.getframerate(), w.getnframes()) == (2, SAMPLE_RATE, 10 * 1920)


def test_output_queue_is_bounded_and_counts_what_it_drops(service):
    async def scenario():
        handler = make_handler(service)
        await handler.start_up()
        assert await asyncio.to_thread(handler.session.ready.wait, 10)
        for chunk in mic_chunks(40):
            await handler.receive(chunk)
            await asyncio.sleep(0.04)  # real time, and nobody calls emit()
        await asyncio.sleep(0.3)
        assert handler.out_q.qsize() <= app.OUTPUT_QUEUE and handler.dropped_out > 0
        await handler.shutdown()

    asyncio.run(scenario())


def test_shutdown_frees_the_slot(service):
    async def scenario():
        handler = make_handler(service)
        await handler.start_up()
        assert service.worker.live_sessions == 1
        await handler.shutdown()
        assert service.worker.live_sessions == 0

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "role,voice,message",
    [
        ("x" * 1200, "TESTV0", "the role prompt is 1200 characters; the limit is 1000"),
        ("", "NATF9", "unknown voice 'NATF9'"),
        ("", app.CUSTOM_VOICE, "upload a custom voice and tick the consent box"),
    ],
)
def test_refused_calls_say_why_then_end(service, role, voice, message):
    async def scenario():
        handler = make_handler(service, role=role, voice=voice)
        await handler.start_up()
        first = await handler.emit()
        assert isinstance(first, AdditionalOutputs) and message in first.args[1]
        assert isinstance(await handler.emit(), CloseStream)
        assert service.worker.live_sessions == 0

    asyncio.run(scenario())


def test_more_callers_than_slots_get_a_busy_message(service):
    async def scenario():
        handlers = [make_handler(service, key=f"c{i}") for i in range(3)]
        for h in handlers:
            await h.start_up()
        item = await handlers[2].emit()
        assert isinstance(item, AdditionalOutputs) and "all 2 conversation slots are in use" in item.args[1]
        for h in handlers:
            await h.shutdown()
        assert service.worker.live_sessions == 0

    asyncio.run(scenario())


def test_a_silent_client_is_closed_by_the_watchdog(service, monkeypatch):
    monkeypatch.setattr(app, "WATCHDOG_S", 0.3)

    async def scenario():
        handler = make_handler(service)
        await handler.start_up()
        await asyncio.sleep(0.4)
        assert isinstance(await handler.emit(), CloseStream)
        assert service.worker.live_sessions == 0

    asyncio.run(scenario())


def test_the_offline_tab_returns_the_models_side_a_stereo_mix_and_the_text(service, tmp_path):
    from personaplex.audio import read_audio

    from .helpers import ROOT

    user = ROOT / "examples" / "user_question.wav"
    seen = []
    agent, mix, text, files = app.run_offline(
        service, str(user), "You enjoy having a good conversation.", "TESTV0", "", False, 0.7, 25, 0.8, 250, 3, False,
        progress=lambda fraction, desc=None: seen.append(fraction),
    )
    n = read_audio(user).size
    assert read_audio(agent).size == n
    with wave.open(mix) as w:
        assert (w.getnchannels(), w.getnframes()) == (2, n)
    assert text and [Path(f).name for f in files] == ["model.wav", "both.wav", "transcript.txt"]
    assert seen and seen[-1] == 1.0
    with pytest.raises(app.gr.Error, match="Upload or record the user's side first"):
        app.run_offline(service, None, "", "TESTV0", "", False, 0.7, 25, 0.8, 250, 3, False, progress=lambda *a, **k: None)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio" * 100)
    with pytest.raises(app.gr.Error, match=r"bad\.wav"):
        app.run_offline(service, str(bad), "", "TESTV0", "", False, 0.7, 25, 0.8, 250, 3, False, progress=lambda *a, **k: None)


def test_a_call_that_fails_on_the_engine_says_so(service, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(service.engine, "start", broken)

    async def scenario():
        handler = make_handler(service)
        await handler.start_up()
        await asyncio.to_thread(handler.session.closed.wait, 10)
        first = await handler.emit()
        assert isinstance(first, AdditionalOutputs) and "the call could not start: CUDA out of memory" in first.args[1]
        assert isinstance(await handler.emit(), CloseStream)

    asyncio.run(scenario())


def test_custom_voice_uploads_get_specific_messages_and_keep_the_previous_voice(service, tmp_path, monkeypatch):
    from personaplex.audio import write_wav

    from .helpers import ROOT, tone

    good = ROOT / "examples" / "voice_sample.wav"
    message, key, _ = app.add_voice(service, str(good), True, "")
    assert "Custom voice ready (8.6 s)" in message and key.startswith("custom:")
    assert app.add_voice(service, str(good), True, "")[1] == key  # cached by content hash
    assert key in service._custom

    cases = {
        "silent.wav": (lambda p: write_wav(p, np.zeros(5 * SAMPLE_RATE, dtype=np.float32)), "the clip is silent"),
        "long.wav": (lambda p: write_wav(p, tone(31.0, SAMPLE_RATE)[0]), "longer than 30 s"),
        "short.wav": (lambda p: write_wav(p, tone(1.5, SAMPLE_RATE)[0]), "use at least 2 s of speech"),
        "empty.wav": (lambda p: p.write_bytes(b""), "could not be decoded"),
        "notes.txt": (lambda p: p.write_text("hello " * 100), "not an audio file|could not be decoded"),
    }
    for name, (make, expected) in cases.items():
        path = tmp_path / name
        make(path)
        message, kept, _ = app.add_voice(service, str(path), True, key)
        assert re.search(expected, message), (name, message)
        assert kept == key and "previous custom voice is kept" in message
    message, kept, _ = app.add_voice(service, str(good), False, key)
    assert "Tick the consent box first" in message and kept == key
    monkeypatch.setattr("personaplex.service.MAX_UPLOAD_BYTES", 1000)
    message, kept, _ = app.add_voice(service, str(good), True, key)
    assert "larger than" in message and kept == key
