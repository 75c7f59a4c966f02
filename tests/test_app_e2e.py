"""The app started as the README starts it, on the tiny checkpoint, driven over real WebRTC by
the aiortc client of examples/ (the browser's exact signalling, no browser)."""

from __future__ import annotations

import asyncio
import importlib.util
import sys

import numpy as np

from .helpers import ROOT

CALL_S = 5.0


def load_client():
    spec = importlib.util.spec_from_file_location("webrtc_client", ROOT / "examples" / "webrtc_client.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module




def test_a_call_over_webrtc_gets_audio_and_a_transcript(running_app):
    client = load_client()
    speech = client.load_48k(str(ROOT / "examples" / "user_question.wav"))
    result = asyncio.run(client.converse(running_app.url, speech, CALL_S, {"voice": "TESTV0", "persona": "Casual chat"}))
    assert result.connected_after_s is not None and result.connected_after_s < 3
    # The remote track (48 kHz after fastrtc and Opus) plays in real time from its first frame on.
    received_s = result.audio.size / client.RATE
    assert result.first_frame_after_s is not None and result.first_frame_after_s < 3
    assert abs(received_s - (CALL_S - result.first_frame_after_s)) < 0.35, (received_s, result.first_frame_after_s)
    loud = np.abs(result.audio) > 0.01
    assert loud.mean() > 0.2  # the (random-weight) model answers with sound most of the time
    assert result.first_audio_after_s is not None and result.first_audio_after_s < 2.0
    assert result.output_updates > 0 and result.transcript  # transcript events reached the page
    assert "engine tick" in result.health
    assert any(e.get("type") == "send_input" for e in result.events)


def test_two_calls_at_once_both_get_their_transcripts(running_app):
    client = load_client()
    speech = client.load_48k(str(ROOT / "examples" / "user_question.wav"))

    async def both():
        return await asyncio.gather(*(client.converse(running_app.url, speech, 3.0, {"voice": "TESTV0"}) for _ in range(2)))

    results = asyncio.run(both())
    assert all(r.transcript and r.audio.size > 2 * client.RATE for r in results)


def test_a_refused_call_gets_its_message(running_app):
    client = load_client()
    result = asyncio.run(client.converse(running_app.url, np.zeros(client.RATE, dtype=np.float32), 3.0, {"voice": "NATF9"}))
    assert "unknown voice 'NATF9'" in result.health
