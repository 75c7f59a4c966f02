"""The fastrtc handler of app.py on the tiny checkpoint, without a browser: audio in and out,
every ending said on the page with the slot and the connection freed, the call's files offered
to its own page only, and every input from the page checked."""

from __future__ import annotations

import asyncio
import json
import re
import wave
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from fastrtc.utils import Context, current_context

from personaplex.model.config import SAMPLE_RATE
from personaplex.runtime.session import REALTIME, Limits
from web import call_page, events
from web.handler import CLOSE_DELAY_S, END_STREAM_DELAY_S, INPUT_RATE, MAX_BUFFERED, Calls, ConversationHandler
from web.values import CALL_INPUT_NAMES, CUSTOM_VOICE, voice_choices, voice_label

from .helpers import ROOT, start_tiny_service

CHUNK = 960  # what fastrtc hands `receive` at the handler's 48 kHz: one 20 ms packet
CHUNK_S = CHUNK / INPUT_RATE
OWNER = "page-token-1"
GOOD = {"owner": OWNER, "role": "You enjoy having a good conversation.", "voice": "TESTV0", "custom_voice": "",
        "consent": False, "temp_text": 0.7, "topk_text": 25, "temp_audio": 0.8, "topk_audio": 250, "seed": 1, "greedy": True,
        "mute": False, "keep_persona": True}


@pytest.fixture(scope="module")
def service():
    svc = start_tiny_service(max_sessions=2)
    yield svc
    svc.worker.stop()


class FakeChannel:
    """The call's data channel: the handler sends the page's updates and the end of the stream on it."""

    readyState = "open"
    bufferedAmount = 0  # bytes not sent yet

    def __init__(self) -> None:
        self.sent: list[str] = []

    def send(self, message: str) -> None:
        self.sent.append(message)

    def updates(self) -> list[dict]:
        """The page's updates sent so far (`web.call_page` messages)."""
        messages = [json.loads(m) for m in self.sent]
        return [m["data"] for m in messages if m.get("type") == call_page.MESSAGE_TYPE]


class FakeConnections:
    """`web.connections.CallConnections` as the handler uses it: a call's state, and closing it."""

    def __init__(self) -> None:
        self.closed: set[str] = set()

    def state(self, call_id: str | None) -> str:
        return "closed" if call_id in self.closed else "connected"

    async def close(self, call_id: str | None) -> None:
        self.closed.add(call_id)


def make_handler(service, limits: Limits = REALTIME, call_id="call-1", **values):
    connections = FakeConnections()
    handler = ConversationHandler(Calls(service, limits, connections))  # type: ignore[arg-type]
    handler.phone_mode = True  # `wait_for_args` returns at once; the inputs are set as fastrtc sets them
    handler.latest_args = ["__webrtc_value__", call_id, *({**GOOD, **values}[name] for name in CALL_INPUT_NAMES)]
    handler.set_channel(FakeChannel())
    current_context.set(Context(webrtc_id=call_id))
    return handler


def mic_chunks(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = np.arange(n * CHUNK) / INPUT_RATE
    pcm = (0.3 * np.sin(2 * np.pi * 300 * t) + 0.02 * rng.standard_normal(t.size)) * 32767
    return [(INPUT_RATE, pcm[i * CHUNK : (i + 1) * CHUNK].astype(np.int16)[None]) for i in range(n)]


async def talk(handler, chunks, realtime=True):
    """Push chunks (in real time), collecting the audio and the page's updates that come out meanwhile."""
    audio = []
    seen = len(handler.channel.updates())
    start = asyncio.get_running_loop().time()
    for i, chunk in enumerate(chunks):
        await handler.receive(chunk)
        deadline = start + (i + 1) * CHUNK_S if realtime else 0.0  # on the clock, not after the last emit
        while True:
            item = await handler.emit()
            audio += [item] if item is not None else []
            if asyncio.get_running_loop().time() >= deadline:
                break
    return audio, handler.channel.updates()[seen:]


async def until_ended(handler, timeout=10.0):
    """Emit until the handler shows the call's end; return that last update."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        await handler.emit()
        ended = [u for u in handler.channel.updates() if "ending" in u]
        if ended:
            return ended[-1]
    raise AssertionError("the call did not end")


def test_every_80_ms_in_gives_80_ms_out_with_silence_while_the_prompt_loads(service):
    async def scenario():
        handler = make_handler(service)
        gate = __import__("threading").Event()
        service.worker.call(gate.wait)  # hold the engine: the prompt cannot run yet
        await handler.start_up()
        early, _ = await talk(handler, mic_chunks(8))
        gate.set()
        while handler.session.phase.value != "live":
            await asyncio.sleep(0.01)
        audio, updates = await talk(handler, mic_chunks(80, seed=1))
        for _ in range(10):  # what the last chunks still have in flight
            item = await handler.emit()
            audio += [item] if item is not None else []
        await handler.shutdown()
        return handler, early, audio, updates

    handler, early, audio, updates = asyncio.run(scenario())
    assert len(early) == 2 and all(rate == SAMPLE_RATE and not pcm.any() for rate, pcm in early)  # silence, in time
    assert len(audio) == 20 and all(rate == SAMPLE_RATE and pcm.shape == (1, 1920) for rate, pcm in audio)
    assert sum(pcm.any() for _, pcm in audio) >= 18
    assert updates
    turns = {key: (role, text) for u in updates for key, role, text in u.get("turns", [])}  # each sent when it changes
    details = [u["details"] for u in updates if "details" in u]  # sent once a second
    assert any(role == "bot" for role, _ in turns.values())  # the tiny model always talks
    assert any(role == "user" and "spoke for" in text for role, text in turns.values())  # and the user did
    assert "You" in updates[-1]["live"] and "Model" in updates[-1]["live"] and "engine tick" in details[-1]
    assert len(details) < len(updates) and sum("turns" in u for u in updates) < len(updates)  # only what changed
    assert service.worker.live_sessions == 0
    recording = handler.session.recording
    with wave.open(str(recording.wav_path)) as w:
        assert (w.getnchannels(), w.getframerate(), w.getnframes()) == (2, SAMPLE_RATE, 22 * 1920)
    files = events.call_files(service, "call-1", OWNER)
    assert [Path(f["value"]).name for f in files] == ["call.wav", "transcript.txt"]
    for someone_else in ("page-token-2", None, "", 5):  # another page asking for the same call gets nothing
        assert all(f["visible"] is False for f in events.call_files(service, "call-1", someone_else))


@pytest.mark.parametrize("ending", ["time limit", "idle"])
def test_the_app_ends_a_call_says_why_frees_everything_and_offers_its_files(service, ending):
    limits = Limits(time_limit_s=1.5) if ending == "time limit" else Limits(idle_timeout_s=0.5)

    async def scenario():
        handler = make_handler(service, limits)
        await handler.start_up()
        await talk(handler, mic_chunks(20 if ending == "time limit" else 10))  # 0.4 s, 0.2 s: ends after
        final = await until_ended(handler)
        await asyncio.sleep(END_STREAM_DELAY_S + CLOSE_DELAY_S + 0.3)
        return handler, final

    handler, final = asyncio.run(scenario())
    message = "time limit of 1 s" if ending == "time limit" else "no audio from your microphone for 0.5 s"
    assert message in final["live"] and final["ending"]["reason"] == ending
    assert "who speaking" not in final["live"] and "ended" in final["live"]  # the meters stop with the call
    assert all(Path(f["value"]).exists() for f in events.call_files(service, "call-1", OWNER))  # what the page then fetches
    assert any('"end_stream"' in m and message in m for m in handler.channel.sent)  # the page stops the call and says why
    assert "call-1" in handler.calls.connections.closed and service.worker.live_sessions == 0


@pytest.mark.parametrize(
    "values,message",
    [
        ({"role": "x" * 1200}, "the role prompt is 1200 characters; the limit is 1000"),
        ({"voice": "NATF9"}, "unknown voice 'NATF9'"),
        ({"voice": CUSTOM_VOICE}, "upload or record a custom voice and tick the consent box"),
        ({"voice": CUSTOM_VOICE, "custom_voice": "custom:x", "consent": "false"}, "upload or record a custom voice"),
        ({"mute": "loud"}, "the mute switch must be true or false"),
        ({"voice": None}, "the voice must be text, got nothing"),
        ({"voice": 123}, "the voice must be text, got 123"),
        ({"voice": ["NATF2"]}, "the voice must be text, got ['NATF2']"),
        ({"role": {"a": 1}}, "the role prompt must be text"),
        ({"seed": 2**63}, "the seed must be a whole number from 0 to 4294967295"),
        ({"seed": "7"}, "the seed must be a whole number, got '7'"),
        ({"temp_text": -1}, "temp_text must be a number from 0 to 10"),
        ({"temp_audio": "hot"}, "the audio temperature must be a number"),
        ({"topk_text": float("nan")}, "the text top-k must be a whole number, got nan"),
        ({"topk_audio": 0}, "topk_audio must be a whole number from 1 to 500"),
        ({"greedy": "yes"}, "greedy must be true or false, got 'yes'"),
    ],
)
def test_bad_settings_end_the_call_with_their_message(service, values, message):
    async def scenario():
        handler = make_handler(service, call_id="refused-call", **values)
        await handler.start_up()
        return await until_ended(handler)

    final = asyncio.run(scenario())
    assert message in final["live"] and "data-ending='refused'" in final["live"] and final["ending"]["reason"] == "refused"
    assert all(f["visible"] is False for f in events.call_files(service, "refused-call", OWNER))  # nothing to download
    assert service.worker.live_sessions == 0


def test_settings_that_never_arrive_end_the_call(service, monkeypatch):
    monkeypatch.setattr("web.handler.ARGS_TIMEOUT_S", 0.2)

    async def scenario():
        handler = make_handler(service)
        handler.phone_mode = False  # fastrtc asks the page; nobody answers (the page's settings event was refused)
        await handler.start_up()
        await until_ended(handler)
        return handler

    handler = asyncio.run(scenario())
    assert handler.session.ending.reason == "refused" and "did not send the call's settings" in handler.session.ending.message


def test_the_string_false_is_false(service):
    async def scenario():
        handler = make_handler(service, greedy="false", seed=-1)
        await handler.start_up()
        await handler.shutdown()
        return handler

    assert asyncio.run(scenario()).session.ending.reason == "stopped"


def test_more_callers_than_slots_get_a_busy_message(service):
    async def scenario():
        handlers = [make_handler(service, call_id=f"c{i}") for i in range(3)]
        for h in handlers:
            await h.start_up()
        final = await until_ended(handlers[2])
        for h in handlers:
            await h.shutdown()
        return final

    assert "all 2 conversation slots are in use" in asyncio.run(scenario())["live"]
    assert service.worker.live_sessions == 0


def test_a_call_that_fails_on_the_engine_says_so(service, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(service.engine, "start_pieces", broken)

    async def scenario():
        handler = make_handler(service)
        await handler.start_up()
        return await until_ended(handler)

    assert "the call could not start: CUDA out of memory" in asyncio.run(scenario())["live"]
    assert service.worker.live_sessions == 0


def test_the_offline_tab_returns_the_models_side_a_stereo_mix_and_the_text(service, tmp_path):
    from personaplex.runtime.audio import read_audio

    user = ROOT / "examples" / "user_question.wav"
    seen = []
    sampling = (0.7, 25, 0.8, 250, 3, False)
    agent, mix, text, files = events.generate_offline(service, str(user), "You enjoy having a good conversation.", "TESTV0", "", False,
                                                   *sampling, progress=lambda fraction, desc=None: seen.append(fraction))
    n = read_audio(user).size
    assert read_audio(agent).size == n
    with wave.open(mix) as w:
        assert (w.getnchannels(), w.getnframes()) == (2, n)
    assert re.match(r"\[0:00\] (You|Model): ", text) and [Path(f).name for f in files] == ["model.wav", "both.wav", "transcript.txt"]
    assert Path(files[0]).parent.parent == service.files.root  # kept in the store, deleted after a while
    assert seen and seen[-1] == 1.0
    for path, message in [(None, "Upload or record the user's side first"), (7, "Upload or record the user's side first")]:
        with pytest.raises(gr.Error, match=message):
            events.generate_offline(service, path, "", "TESTV0", "", False, *sampling, progress=lambda *a, **k: None)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio" * 100)
    with pytest.raises(gr.Error, match=r"bad\.wav"):
        events.generate_offline(service, str(bad), "", "TESTV0", "", False, *sampling, progress=lambda *a, **k: None)
    with pytest.raises(gr.Error, match="the seed must be"):
        events.generate_offline(service, str(user), "", "TESTV0", "", False, 0.7, 25, 0.8, 250, 2**40, False, progress=lambda *a, **k: None)


def test_custom_voice_uploads_get_specific_messages_and_keep_the_previous_voice(service, tmp_path, monkeypatch):
    from personaplex.runtime.audio import read_audio, write_wav

    from .helpers import tone

    good = ROOT / "examples" / "voice_sample.wav"
    waiting = events.upload_voice(service, str(good), False, "", None, "page-1")
    assert "Tick the consent box to use this clip" in waiting.message and waiting.key == "" and waiting.outcome == ""
    ready = events.upload_voice(service, str(good), True, "", None, "page-1")  # consent ticked: it applies
    assert "Custom voice ready (8.6 s)" in ready.message and ready.key.startswith("custom:") and ready.outcome == "ready"
    played = read_audio(ready.heard)  # the voice in use, as the model hears it (-24 LUFS)
    assert ready.kept == ready.heard and played.size == read_audio(good).size and np.abs(played).max() > 0.01
    assert events.show_upload("ready")[0]["value"] == CUSTOM_VOICE  # the page selects it and shows it
    assert events.upload_voice(service, str(good), True, "", None, "page-1").key == ready.key  # the same clip, the same page
    assert service.voices.has(ready.key)

    cases = {
        "silent.wav": (lambda p: write_wav(p, np.zeros(6 * SAMPLE_RATE, dtype=np.float32)), "the clip is silent"),
        "long.wav": (lambda p: write_wav(p, tone(31.0, SAMPLE_RATE)[0]), "longer than 30 s"),
        "short.wav": (lambda p: write_wav(p, tone(3.0, SAMPLE_RATE)[0]), "use at least 5 s of speech"),
        "empty.wav": (lambda p: p.write_bytes(b""), "could not be decoded"),
        "notes.txt": (lambda p: p.write_text("hello " * 100), "not an audio file|could not be decoded"),
        "gone.wav": (lambda p: None, "gone.wav: the clip is not on the server"),  # a path a client made up
    }
    for name, (make, expected) in cases.items():
        path = tmp_path / name
        make(path)
        refused = events.upload_voice(service, str(path), True, ready.key, ready.heard, "page-1")
        assert re.search(expected, refused.message), (name, refused.message)
        assert "previous custom voice is kept" in refused.message and refused.outcome == "refused"
        assert (refused.key, refused.heard) == (ready.key, ready.heard)  # the voice and its playback stay
    assert events.show_upload("refused")[1]["value"] is None  # the box is cleared: it takes a new clip
    refused = events.upload_voice(service, str(good), ["yes"], ready.key, ready.heard, "page-1")
    assert "the consent box must be true or false" in refused.message and refused.key == ready.key
    monkeypatch.setattr("personaplex.serve.contract.MAX_UPLOAD_BYTES", 1000)
    refused = events.upload_voice(service, str(good), True, ready.key, ready.heard, "page-1")
    assert "larger than" in refused.message and refused.key == ready.key


def test_a_voice_preview_is_the_model_greeting_on_silence_made_once(service):
    path = Path(events.preview_voice(service, "TESTV0"))
    assert path.exists()
    mtime = path.stat().st_mtime
    assert events.preview_voice(service, "TESTV0") == str(path) and path.stat().st_mtime == mtime  # cached
    from personaplex.runtime.audio import read_audio

    assert read_audio(path).size == 4 * SAMPLE_RATE
    with pytest.raises(gr.Error, match="unknown voice 'NATF9'"):
        events.preview_voice(service, "NATF9")


def test_voice_labels_say_what_the_release_names_mean():
    assert voice_label("NATF2") == "NATF2 · natural, female" and voice_label("VARM4") == "VARM4 · varied, male"
    assert voice_label("TESTV0") == "TESTV0"
    assert voice_choices(["NATM1"]) == [("NATM1 · natural, male", "NATM1"), (CUSTOM_VOICE, CUSTOM_VOICE)]


def test_the_status_line_says_what_the_engine_does_now(service, monkeypatch):
    from personaplex.serve.contract import EngineFigures

    assert "Ready**: on cpu (float32 weights and KV cache) for 2 conversations at once" in events.status_markdown(service)  # idle: the warm-up's figure
    for figures, expected, dot in [
        (EngineFigures(1, 2, 21.0), "1 of 2 conversations in progress; an 80 ms frame of all of them takes 21 ms now", "ready"),
        (EngineFigures(2, 2, 70.0), "takes 70 ms now, near the 80 ms a frame lasts", "busy"),
        (EngineFigures(2, 2, 160.0), "2.0x slower than real time: live audio will stutter", "failed"),
    ]:
        monkeypatch.setattr(service, "figures", lambda figures=figures: figures)
        text = events.status_markdown(service)
        assert expected in text and f"dot {dot}" in text, text
    monkeypatch.setattr(service.engine, "graphs_failed", "RuntimeError: CUDA error: operation not permitted")
    monkeypatch.setattr(service, "figures", lambda: EngineFigures(0, 2, 9.0))
    text = events.status_markdown(service)  # a failed capture is said, not only logged
    assert "running without CUDA graphs" in text and "operation not permitted" in text and "dot busy" in text
    monkeypatch.setattr(service.engine, "graphs_failed", None)
    monkeypatch.setattr(service.engine, "compile_failed", "BackendCompilerFailed: no C++ compiler")
    text = events.status_markdown(service)
    assert "running uncompiled" in text and "no C++ compiler" in text and "dot busy" in text
    monkeypatch.setattr(service.engine, "compile_failed", None)
    monkeypatch.setattr(service.engine, "prefix_attention_failed", "InductorError: <no flex kernel>")
    text = events.status_markdown(service)
    assert "whole window" in text and "&lt;no flex kernel&gt;" in text and "dot busy" in text


def test_live_captions_are_escaped_and_show_the_end_of_a_long_turn():
    from personaplex.runtime.transcript import Transcript

    t = Transcript()
    for i in range(3000):  # a monologue of 4 minutes without a pause
        t.add(i * 0.08, " <w>" if i == 2999 else " word")
    ((key, role, text),) = call_page.turns(t)
    assert key == "M0" and role == "bot" and text.startswith("0:00 · …")
    assert text.endswith("word &lt;w&gt;") and len(text) < call_page.CAPTION_CHARS + 20


def test_page_updates_wait_while_the_page_has_not_taken_the_last_ones(service):
    """A page (or a network) that falls behind must not pile up updates: while the channel holds
    unsent bytes, an update is skipped, and the next one carries everything that changed."""

    async def scenario():
        handler = make_handler(service)
        await handler.start_up()
        while handler.session.phase.value != "live":
            await asyncio.sleep(0.01)
        handler.channel.bufferedAmount = MAX_BUFFERED + 1
        _, held = await talk(handler, mic_chunks(40))  # 0.8 s: 10 frames, 3 updates due
        handler.channel.bufferedAmount = 0
        _, sent = await talk(handler, mic_chunks(40, seed=2))
        await handler.shutdown()
        return held, sent

    held, sent = asyncio.run(scenario())
    assert held == [] and len(sent) >= 2 and "turns" in sent[0] and "details" in sent[0]


def test_as_many_calls_as_the_engine_holds_each_get_their_pages_updates():
    """64 calls at once (the default for a GPU), each on its own data channel: no Gradio worker
    is held by a call's updates, so nothing but the engine's slots bounds how many are served."""
    from .helpers import start_tiny_service

    service = start_tiny_service(max_sessions=64)

    async def one(i: int):
        handler = make_handler(service, call_id=f"call-{i}")
        await handler.start_up()
        while handler.session.phase.value in ("waiting", "starting"):  # the microphone goes on meanwhile
            await talk(handler, mic_chunks(5, seed=i))
        live = service.worker.live_sessions
        await talk(handler, mic_chunks(50, seed=i))  # a second of speech, live
        await handler.shutdown()
        return handler.channel.updates(), live, handler.session.ending

    async def everyone():
        return await asyncio.gather(*(one(i) for i in range(64)))

    try:
        results = asyncio.run(everyone())
    finally:
        service.worker.stop()
    assert max(live for _, live, _ in results) == 64
    for updates, _, ending in results:
        assert ending.reason == "stopped" and any("class='verdict ok'" in u["live"] or "verdict behind" in u["live"]
                                                  or "verdict dropping" in u["live"] for u in updates)


def test_a_channel_that_refuses_the_ending_does_not_keep_the_connection_open(service):
    """A message the data channel will not take (it closed, or the message is too large) must not
    stop the app from closing the connection: a connection left open keeps its place."""

    class Refusing(FakeChannel):
        def send(self, message: str) -> None:
            raise ValueError("Data must be at most 262144 bytes")

    async def scenario():
        handler = make_handler(service, call_id="refusing", voice="V" * 65)  # refused: the name is too long
        handler.set_channel(Refusing())
        await handler.start_up()
        for _ in range(20):
            await handler.emit()
        await asyncio.sleep(END_STREAM_DELAY_S + CLOSE_DELAY_S + 0.3)
        return handler

    handler = asyncio.run(scenario())
    assert "at most 64 are accepted" in handler.session.ending.message and len(handler.session.ending.message) < 100
    assert "refusing" in handler.calls.connections.closed
