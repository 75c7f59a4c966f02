"""The app started as the README starts it, on the tiny checkpoint, driven over real WebRTC by
the aiortc client of examples/ (the browser's exact signalling, no browser): a call and its
recording, two calls at once, refusals and bad settings through Gradio's API, broken clients,
and another page asking for someone's recording."""

from __future__ import annotations

import asyncio
import io
import secrets
import sys
import time
import wave

import httpx
import numpy as np
import pytest

from .helpers import ROOT

CALL_S = 20.0


def test_a_call_over_webrtc_gets_audio_a_transcript_and_a_recording_as_long_as_the_call(running_app, client, speech):
    result = asyncio.run(client.converse(running_app.url, speech, CALL_S, {"voice": "TESTV0", "persona": "Casual chat"}))
    assert result.connected_after_s is not None and result.connected_after_s < 3
    # The remote track (48 kHz after fastrtc and Opus) plays in real time from its first frame on.
    received_s = result.audio.size / client.RATE
    assert result.first_frame_after_s is not None and result.first_frame_after_s < 3
    assert abs(received_s - (CALL_S - result.first_frame_after_s)) < 0.5, (received_s, result.first_frame_after_s)
    loud = np.abs(result.audio) > 0.01
    assert loud.mean() > 0.2  # the (random-weight) model answers with sound most of the time
    assert result.first_audio_after_s is not None and result.first_audio_after_s < 2.0
    assert result.output_updates > 0 and any(m["role"] == "assistant" for m in result.conversation)  # captions reached the page
    assert "engine tick" in result.details and "<s>" not in result.transcript and "Model" in result.live
    assert result.recording_url and result.transcript_url  # asked for as the page's stop button does
    with wave.open(io.BytesIO(asyncio.run(client.fetch(result.recording_url)))) as w:
        seconds = w.getnframes() / w.getframerate()
        assert w.getnchannels() == 2 and abs(seconds - CALL_S) <= 0.5, seconds
    assert asyncio.run(client.fetch(result.transcript_url)).decode().startswith("[0:0")


def test_two_calls_at_once_both_get_their_transcripts(running_app, client, speech):
    async def both():
        return await asyncio.gather(*(client.converse(running_app.url, speech, 3.0, {"voice": "TESTV0"}) for _ in range(2)))

    results = asyncio.run(both())
    assert all(r.transcript and r.audio.size > 2 * client.RATE for r in results)


BAD_SETTINGS = [
    ({"voice": "NATF9"}, "unknown voice 'NATF9'"),
    ({"voice": None}, "the voice must be text, got nothing"),
    ({"voice": 123}, "the voice must be text, got 123"),
    ({"voice": ["TESTV0"]}, "the voice must be text"),
    ({"voice": "TESTV0", "seed": 2**63}, "the seed must be a whole number from 0 to 4294967295"),
    ({"voice": "TESTV0", "temp_text": -1}, "temp_text must be a number from 0 to 10"),
    ({"voice": "Custom voice (uploaded)", "consent": "false"}, "upload or record a custom voice and tick the consent box"),
    ({"voice": "TESTV0", "topk_text": "NaN"}, "the text top-k must be a whole number"),
]


@pytest.mark.parametrize("batch", [BAD_SETTINGS[:4], BAD_SETTINGS[4:]], ids=["voices", "settings"])
def test_bad_settings_through_the_api_end_the_call_with_their_message(running_app, client, batch):
    silence = np.zeros(client.RATE, dtype=np.float32)

    async def calls():
        return await asyncio.gather(*(client.converse(running_app.url, silence, 8.0, settings) for settings, _ in batch))

    for result, (_, message) in zip(asyncio.run(calls()), batch):
        assert result.refused and message in result.ended and message in result.live


def test_clients_that_never_send_settings_or_freeze_are_closed_and_free_their_places(running_app, client, speech):
    """More broken connections than fastrtc admits at once (max sessions + 4) must not lock
    anyone out: each is closed within 5 s."""
    async def broken():
        never = [client.converse(running_app.url, speech, 9.0, {"voice": "TESTV0"}, answer_settings=False) for _ in range(4)]
        frozen = [client.converse(running_app.url, speech, 9.0, {"voice": "TESTV0"}, freeze_after_s=1.0) for _ in range(2)]
        return await asyncio.gather(*never, *frozen)

    started = time.monotonic()
    results = asyncio.run(broken())
    for r in results[:4]:  # no settings: closed after the app's wait for them
        assert r.ended and "did not send the call's settings" in r.ended
        assert r.closed_by_app_after_s is not None and r.closed_by_app_after_s < 5.0 + 1.0, r.closed_by_app_after_s
    for r in results[4:]:  # froze after 1 s: closed after the idle timeout
        assert r.ended and "no audio from your microphone" in r.ended
        assert r.closed_by_app_after_s is not None and r.closed_by_app_after_s < 1.0 + 5.0 + 1.0, r.closed_by_app_after_s
    assert time.monotonic() - started < 12
    after = asyncio.run(client.converse(running_app.url, speech, 3.0, {"voice": "TESTV0"}))
    assert after.transcript and not after.refused  # everyone's place is free again


def test_another_page_cannot_fetch_a_calls_recording(running_app, client, speech):
    result = asyncio.run(client.converse(running_app.url, speech, 3.0, {"voice": "TESTV0"}))
    assert result.recording_url
    call_id = result.webrtc_id

    async def as_another_page(load_page: bool):
        async with httpx.AsyncClient(timeout=30) as http:
            page = client.Page((await http.get(f"{running_app.url}/config")).json())
            session = secrets.token_hex(6)
            if load_page:
                await client._load_page(http, running_app.url, page, session)
            stolen = client.CallResult(audio=np.zeros(0))
            await client._call_files(http, running_app.url, page, session, call_id, stolen)
            return stolen

    for load_page in (True, False):
        stolen = asyncio.run(as_another_page(load_page))
        assert stolen.recording_url is None and stolen.transcript_url is None


def test_the_client_exits_non_zero_with_the_apps_message_when_a_call_is_refused(running_app, tmp_path):
    import subprocess

    run = subprocess.run([sys.executable, str(ROOT / "examples" / "webrtc_client.py"), "--url", running_app.url,
                          "--input", str(ROOT / "examples" / "user_question.wav"), "--output", str(tmp_path / "reply.wav"),
                          "--voice", "NATF2", "--seconds", "5"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "unknown voice 'NATF2'; this checkpoint has: TESTV0" in run.stderr, run.stderr
    assert not (tmp_path / "reply.wav").exists()


def test_the_page_and_the_websocket_protocol_serve_calls_at_once_from_one_engine(running_app, client, speech):
    from examples.chat_client import talk

    ws_url = running_app.url.replace("http://", "ws://") + "/api/chat"
    speech_24k = speech[::2].copy()  # (the WebRTC client's 48 kHz speech, at the protocol's 24 kHz)

    async def both():
        return await asyncio.gather(client.converse(running_app.url, speech, 5.0, {"voice": "TESTV0"}),
                                    talk(ws_url, {"voice_prompt": "TESTV0.pt", "text_prompt": ""}, speech_24k, 5.0))

    webrtc, ws = asyncio.run(both())
    assert webrtc.audio.size / client.RATE > 3.5 and webrtc.ended is None
    assert ws.error is None and ws.seconds > 4.5 and "".join(ws.text).strip()
    deadline = time.monotonic() + 5
    ended = []
    while not ended and time.monotonic() < deadline:
        ended = [line for line in running_app.output().splitlines() if "personaplex.call: chat" in line and "ended (stopped)" in line]
        time.sleep(0.1)
    assert ended  # the WebSocket call's ending, in one line with its reason
