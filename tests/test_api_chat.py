"""The Moshi/PersonaPlex WebSocket protocol at /api/chat (web/api_chat.py) on the tiny checkpoint:
a call with audio back for its whole length and the model's text, each refusal as a kind-5
message, pings and unknown kinds that end nothing, a vanished client's slot freed, endings said,
and the same tokens as a WebRTC call: the door changes nothing."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import sphn
import uvicorn
import websockets
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute

from examples.chat_client import CHUNK, RATE, talk
from personaplex.errors import SettingsError
from personaplex.model.config import DEFAULT_TEXT_PROMPT, SamplingParams
from personaplex.runtime.port import Port
from personaplex.runtime.session import REALTIME, Limits
from personaplex.serve.api_chat import AUDIO, ERROR, HANDSHAKE, PATH, ChatDoor, chat_query, chat_settings
from personaplex.serve.contract import CallSettings
from personaplex.serve.service import Service, Settings
from web.handler import INPUT_RATE, Calls, ConversationHandler
from web.values import CALL_INPUT_NAMES

from .helpers import ROOT, free_port, start_tiny_service

VOICES = ["NATF2", "TESTV0"]


@pytest.fixture(scope="module")
def service():
    svc = start_tiny_service(max_sessions=2)
    yield svc
    svc.stop()


class DoorServer:
    """A door on its own uvicorn server (a thread), as the app serves it beside the page."""

    def __init__(self, service: Service, limits: Limits = REALTIME) -> None:
        app = Starlette(routes=[WebSocketRoute(PATH, ChatDoor(service, limits, "TESTV0").serve)])
        port = free_port()
        self.url = f"ws://127.0.0.1:{port}{PATH}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def door(service):
    server = DoorServer(service)
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    pcm, _ = sphn.read(str(ROOT / "examples" / "user_question.wav"), sample_rate=RATE)
    return pcm.mean(axis=0).astype(np.float32)


def query(**values: str) -> dict[str, str]:
    return {"text_prompt": "You enjoy having a good conversation.", "voice_prompt": "TESTV0.pt", **values}


# --- the query ------------------------------------------------------------------------------
def test_the_query_is_read_as_the_official_clients_send_it():
    official = {"text_temperature": "0.7", "text_topk": "25", "audio_temperature": "0.8", "audio_topk": "250",
                "pad_mult": "0", "text_seed": "123", "audio_seed": "456", "repetition_penalty_context": "64",
                "repetition_penalty": "1.0", "text_prompt": "You are a chef.", "voice_prompt": "NATF2.pt", "seed": "9"}
    settings = chat_settings(official, VOICES, "NATF2")
    sampling = SamplingParams(temp_text=0.7, topk_text=25, temp_audio=0.8, topk_audio=250, seed=9)
    assert settings == CallSettings("NATF2", "You are a chef.", sampling, keep_persona=True)
    settings = chat_settings({}, VOICES, "NATF2")  # Kyutai's client sends no query at all
    assert (settings.voice, settings.role, settings.sampling.topk_audio) == ("NATF2", DEFAULT_TEXT_PROMPT, 250)
    assert chat_settings({"voice_prompt": "TESTV0"}, VOICES, "NATF9").voice == "TESTV0"
    assert chat_settings({}, ["TESTV0"], "NATF2").voice == "TESTV0"  # the default persona's voice is not in this checkpoint
    assert not chat_settings({"keep_persona": "false"}, VOICES, "NATF2").keep_persona
    assert chat_settings(chat_query(settings), VOICES, "NATF2") == settings  # what a page in front sends, read back


@pytest.mark.parametrize(("values", "said"), [
    ({"voice_prompt": "../../etc/passwd"}, "unknown voice '../../etc/passwd'"),
    ({"voice_prompt": "/tmp/NATF2.pt"}, "unknown voice"),
    ({"voice_prompt": "x" * 500}, "at most 64"),
    ({"text_topk": "many"}, "the text top-k must be a whole number"),
    ({"audio_topk": "0"}, "from 1 to 500"),
    ({"text_temperature": "nan"}, "the text temperature must be a number"),
    ({"seed": "-5"}, "the seed must be a whole number from 0"),
])
def test_a_bad_query_value_is_refused_with_what_is_wrong(values, said):
    with pytest.raises(SettingsError, match=said.replace("(", r"\(").replace(".", r"\.")):
        chat_settings(values, VOICES, "NATF2")


# --- calls ----------------------------------------------------------------------------------
def test_a_10_s_call_gets_the_models_audio_for_the_whole_call_and_its_text(door, speech):
    result = asyncio.run(talk(door, query(seed="3"), speech, 10.0))
    assert result.error is None and result.handshake_s is not None
    assert result.seconds >= 9.5  # an 80 ms frame out for every 80 ms in, to the end
    assert "".join(result.text).strip()  # the tiny model babbles: its pieces arrive as kind 2
    assert result.closed.startswith("1000")


@pytest.mark.parametrize(("values", "said"), [
    ({"voice_prompt": "../../etc/passwd"}, "unknown voice"),
    ({"audio_temperature": "hot"}, "the audio temperature must be a number"),
    ({"text_prompt": "x" * 1001}, "the role prompt is 1001 characters"),
])
def test_each_refusal_is_a_kind_5_message(door, speech, values, said):
    result = asyncio.run(talk(door, query(**values), speech, 1.0))
    assert result.handshake_s is None and said in result.error


def test_a_busy_server_and_a_model_still_loading_are_refused_with_their_reason(door, speech):
    async def three_calls():
        held = [asyncio.create_task(talk(door, query(), speech, 4.0)) for _ in range(2)]
        await asyncio.sleep(2.0)  # both have their slots
        third = await talk(door, query(), speech, 1.0)
        return third, await asyncio.gather(*held)

    third, held = asyncio.run(three_calls())
    assert all(r.error is None and r.seconds > 3.0 for r in held)
    assert third.handshake_s is None and "conversation slots are in use" in third.error

    loading = Service(Settings(checkpoint=str(ROOT / "missing"), device="cpu"))  # never started: not ready
    server = DoorServer(loading)
    try:
        result = asyncio.run(talk(server.url, query(), speech, 1.0))
    finally:
        server.stop()
    assert result.handshake_s is None and "the model is not ready" in result.error


def test_pings_control_and_unknown_kinds_never_end_a_call(door):
    async def call() -> tuple[float, bool]:
        writer, reader = sphn.OpusStreamWriter(RATE), sphn.OpusStreamReader(RATE)
        heard = 0
        async with websockets.connect(f"{door}?voice_prompt=TESTV0") as ws:
            assert (await ws.recv())[0] == HANDSHAKE
            for i in range(50):  # 2 s
                await ws.send(bytes([AUDIO]) + bytes(writer.append_pcm(np.zeros(CHUNK, dtype=np.float32))))
                if i % 10 == 5:
                    for junk in (bytes([6]), bytes([3, 0]), bytes([4]) + b"{}", bytes([42, 1, 2]), "hello", b""):
                        await ws.send(junk)
                await asyncio.sleep(CHUNK / RATE)
                while True:
                    try:
                        message = await asyncio.wait_for(ws.recv(), 0.001)
                    except TimeoutError:
                        break
                    assert message[0] != ERROR, message
                    if message[0] == AUDIO:
                        heard += np.asarray(reader.append_bytes(bytes(message[1:]))).size
            return heard / RATE, ws.close_code is None

    heard_s, open_ = asyncio.run(call())
    assert open_ and heard_s > 1.0


def test_a_client_that_vanishes_frees_its_slot_within_seconds(service, door):
    async def vanish() -> None:
        writer = sphn.OpusStreamWriter(RATE)
        ws = await websockets.connect(f"{door}?voice_prompt=TESTV0")
        assert (await ws.recv())[0] == HANDSHAKE
        for _ in range(10):
            await ws.send(bytes([AUDIO]) + bytes(writer.append_pcm(np.zeros(CHUNK, dtype=np.float32))))
            await asyncio.sleep(CHUNK / RATE)
        assert service.figures().live == 1
        ws.transport.abort()  # no close frame: the process died, the network went away

    asyncio.run(vanish())
    gone = time.monotonic()
    while service.figures().live and time.monotonic() - gone < 5:
        time.sleep(0.05)
    assert service.figures().live == 0 and time.monotonic() - gone < 2.0


def test_the_time_limit_is_said_then_the_connection_closed(service, speech):
    server = DoorServer(service, Limits(time_limit_s=2.0))
    try:
        result = asyncio.run(talk(server.url, query(), speech, 6.0))
    finally:
        server.stop()
    assert result.handshake_s is not None and "time limit of 2 s" in result.error
    assert result.closed.startswith("1000") and 1.0 < result.seconds < 3.0


def test_a_webrtc_call_and_a_websocket_call_give_the_same_tokens(service, door, monkeypatch):
    """One engine, the same persona, seed and (silent) input through each door, one call after the
    other: the model's text ids, tick by tick, are the same (one run may be a few ticks longer)."""
    from fastrtc.utils import Context, current_context


    answered: dict[int, list[int]] = {}
    original = Port.answer

    def spy(self: Port, pcm: np.ndarray, text_id: int) -> None:
        answered.setdefault(id(self), []).append(text_id)
        original(self, pcm, text_id)

    monkeypatch.setattr(Port, "answer", spy)
    settings = {"owner": None, "role": "You enjoy having a good conversation.", "voice": "TESTV0", "custom_voice": "",
                "consent": False, "temp_text": 0.7, "topk_text": 25, "temp_audio": 0.8, "topk_audio": 250, "seed": 11,
                "greedy": False, "mute": False, "keep_persona": True}

    async def webrtc_call() -> None:
        handler = ConversationHandler(Calls(service, REALTIME))
        handler.phone_mode = True  # the settings are there at once, as fastrtc sets them
        handler.latest_args = ["__webrtc__", "call-1", *(settings[name] for name in CALL_INPUT_NAMES)]
        current_context.set(Context(webrtc_id="call-1"))
        await handler.start_up()
        assert await handler.session.until_live(10)
        began = time.monotonic()
        silence = np.zeros(960, dtype=np.int16)  # 20 ms at 48 kHz, as fastrtc hands it over
        for i in range(150):  # 3 s
            await handler.receive((INPUT_RATE, silence))
            await handler.emit()
            await asyncio.sleep(max(0.0, began + (i + 1) * 0.02 - time.monotonic()))
        await handler.shutdown()

    asyncio.run(webrtc_call())
    ws = asyncio.run(talk(door, query(seed="11", text_prompt=settings["role"]), np.zeros(0, np.float32), 3.0))
    assert ws.error is None
    (first, second) = answered.values()
    n = min(len(first), len(second))
    assert n >= 30 and len(set(first[:n])) > 5  # the model said things (not only padding)
    assert first[:n] == second[:n]


def test_an_independent_client_ffmpegs_opus_page_by_page_gets_a_whole_12_s_call(door, speech):
    """Not the project's client: ffmpeg's Opus encoder and Ogg muxer (PyAV), two 20 ms frames a
    page as NVIDIA's web client sends them, the first pages sent before the handshake as
    Full-Duplex-Bench's adapter does; the server's pages decoded by ffmpeg at the end."""
    import io

    import av

    async def call() -> tuple[bytes, str]:
        sink = io.BytesIO()
        muxer = av.open(sink, "w", format="ogg", options={"page_duration": "40000"})
        stream = muxer.add_stream("libopus", rate=RATE, layout="mono")
        stream.options = {"frame_duration": "20"}
        mic = np.zeros(12 * RATE, dtype=np.float32)
        mic[: min(speech.size, mic.size)] = speech[: mic.size]
        received, text, sent_to = bytearray(), [], 0
        async with websockets.connect(f"{door}?text_prompt=&voice_prompt=TESTV0.pt") as ws:
            began = time.monotonic()
            handshake = None
            for i in range(0, mic.size, 480):
                frame = av.AudioFrame.from_ndarray(mic[None, i : i + 480], format="flt", layout="mono")
                frame.sample_rate = RATE
                for packet in stream.encode(frame):
                    muxer.mux(packet)
                pages = sink.getvalue()[sent_to:]
                if pages:
                    sent_to += len(pages)
                    await ws.send(bytes([AUDIO]) + pages)
                await asyncio.sleep(max(0.0, began + (i + 480) / RATE - time.monotonic()))
                while True:
                    try:
                        message = await asyncio.wait_for(ws.recv(), 0.0005)
                    except TimeoutError:
                        break
                    if message[0] == HANDSHAKE:
                        handshake = time.monotonic() - began
                    elif message[0] == AUDIO:
                        received += message[1:]
                    elif message[0] == 2:
                        text.append(bytes(message[1:]).decode())
                    else:
                        raise AssertionError(f"kind {message[0]}: {bytes(message[1:])!r}")
            assert handshake is not None and handshake < 2.0
        return bytes(received), "".join(text)

    received, text = asyncio.run(call())
    with av.open(io.BytesIO(received), format="ogg") as container:
        heard = sum(frame.samples for frame in container.decode(audio=0)) / container.streams.audio[0].sample_rate
    assert heard >= 11.0 and text.strip()  # the model's audio for the call (less the handshake's wait), and its words
