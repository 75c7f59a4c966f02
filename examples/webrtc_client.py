"""Talk to a running PersonaPlex Live app over WebRTC from Python, the way the browser does.

    python examples/webrtc_client.py --url http://127.0.0.1:7860 --input examples/user_question.wav \
        --output reply.wav [--voice NATF2] [--role "You enjoy having a good conversation."]

It reads the page's /config, sends an SDP offer through Gradio's component server, answers the
app's "send_input" request with the persona settings, streams the wav as the microphone (20 ms
Opus frames, in real time, then silence), records what comes back, and follows the transcript
through Gradio's event stream. Needs aiortc and httpx (both come with fastrtc).
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from av import AudioFrame

RATE = 48_000
PTIME = 960  # 20 ms at 48 kHz


class FileTrack(MediaStreamTrack):
    """Plays float32 mono pcm at 48 kHz in real time, then silence."""

    kind = "audio"

    def __init__(self, pcm: np.ndarray) -> None:
        super().__init__()
        self.pcm = np.clip(pcm, -1, 1)
        self.sent = 0
        self.start: float | None = None

    async def recv(self) -> AudioFrame:
        if self.start is None:
            self.start = time.monotonic()
        due = self.start + self.sent / RATE
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        chunk = self.pcm[self.sent : self.sent + PTIME]
        chunk = np.pad(chunk, (0, PTIME - chunk.size))
        frame = AudioFrame.from_ndarray((chunk * 32767).astype(np.int16)[None], format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, self.sent, fractions.Fraction(1, RATE)
        self.sent += PTIME
        return frame


@dataclass
class CallResult:
    audio: np.ndarray  # float32 mono at 48 kHz, as played by the remote track
    transcript: str = ""
    health: str = ""
    events: list[dict] = field(default_factory=list)  # data-channel messages
    output_updates: int = 0  # transcript/health updates seen through Gradio
    connected_after_s: float | None = None
    first_frame_after_s: float | None = None  # the first frame of the remote track
    first_audio_after_s: float | None = None  # the first frame that is not silence


def _apply(value: str, diff: object) -> str:
    """Apply a Gradio streaming output: a full value or a list of ["replace"|"append", path, text]."""
    if isinstance(diff, str) or diff is None:
        return diff or ""
    for op, _path, text in diff:  # type: ignore[misc]
        value = text if op == "replace" else value + text
    return value


class Page:
    """What the client needs from the app's /config."""

    def __init__(self, config: dict) -> None:
        components = config["components"]
        self.by_elem = {c.get("props", {}).get("elem_id"): c for c in components}
        self.webrtc = next(c["id"] for c in components if c.get("type") == "webrtc")
        deps = config["dependencies"]
        self.tick = next(d for d in deps if [self.webrtc, "tick"] in d["targets"])
        self.state_change = next(d for d in deps if [self.webrtc, "state_change"] in d["targets"])
        self.values = {c["id"]: c.get("props", {}).get("value") for c in components}

    def inputs(self, dep: dict, webrtc_id: str, overrides: dict[str, object]) -> list:
        ids = {c["id"]: key for key, c in self.by_elem.items() if key}
        data = []
        for cid in dep["inputs"]:
            if cid == self.webrtc:
                data.append({"webrtc_id": webrtc_id, "textbox": "", "audio": None})
            else:
                data.append(overrides.get(ids.get(cid, ""), self.values.get(cid)))
        return data


async def _follow_outputs(client: httpx.AsyncClient, url: str, session: str, result: CallResult, stop: asyncio.Event) -> None:
    """Read Gradio's event stream for this session and keep the latest transcript and health."""
    while not stop.is_set():
        try:
            async with client.stream("GET", f"{url}/gradio_api/queue/data", params={"session_hash": session}, timeout=None) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    msg = json.loads(line[5:])
                    if msg.get("msg") in ("process_generating", "process_completed") and msg.get("output", {}).get("data"):
                        text, html = (msg["output"]["data"] + [None, None])[:2]
                        result.transcript = _apply(result.transcript, text)
                        result.health = _apply(result.health, html)
                        result.output_updates += 1
                    if stop.is_set():
                        return
        except (httpx.HTTPError, json.JSONDecodeError):
            pass
        await asyncio.sleep(0.2)


async def converse(url: str, user_pcm_48k: np.ndarray, seconds: float, settings: dict[str, object] | None = None) -> CallResult:
    """Hold a call of `seconds`, sending `user_pcm_48k` as the microphone. `settings` overrides
    input values by elem_id (persona, role, voice, consent, ...)."""
    url = url.rstrip("/")
    settings = settings or {}
    session, webrtc_id = secrets.token_hex(6), secrets.token_hex(8)
    result = CallResult(audio=np.zeros(0, dtype=np.float32))
    received: list[np.ndarray] = []
    stop = asyncio.Event()
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=30) as client:
        page = Page((await client.get(f"{url}/config")).json())
        pc = RTCPeerConnection()
        channel = pc.createDataChannel("text")
        pc.addTrack(FileTrack(user_pcm_48k))
        tasks: list[asyncio.Task] = []

        async def join(dep: dict) -> None:
            body = {"data": page.inputs(dep, webrtc_id, settings), "fn_index": dep["id"], "session_hash": session,
                    "trigger_id": page.webrtc, "event_data": None}
            (await client.post(f"{url}/gradio_api/queue/join", json=body)).raise_for_status()

        @channel.on("message")
        def on_message(message: str) -> None:
            event = json.loads(message)
            result.events.append(event)
            if event.get("type") == "send_input":
                tasks.append(asyncio.ensure_future(join(page.tick)))
            elif event.get("type") == "fetch_output" and not any(e.get("type") == "fetch_output" for e in result.events[:-1]):
                async def outputs() -> None:
                    await join(page.state_change)
                    await _follow_outputs(client, url, session, result, stop)
                tasks.append(asyncio.ensure_future(outputs()))

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState == "connected" and result.connected_after_s is None:
                result.connected_after_s = time.monotonic() - started

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            async def record() -> None:
                while True:
                    try:
                        frame = await track.recv()
                    except Exception:
                        return
                    pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels)).mean(axis=1) / 32768.0
                    if result.first_frame_after_s is None:
                        result.first_frame_after_s = time.monotonic() - started
                    if result.first_audio_after_s is None and np.abs(pcm).max() > 1e-3:
                        result.first_audio_after_s = time.monotonic() - started
                    received.append(pcm.astype(np.float32))
            tasks.append(asyncio.ensure_future(record()))

        await pc.setLocalDescription(await pc.createOffer())
        body = {"session_hash": session, "component_id": page.webrtc, "fn_name": "offer",
                "data": {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type, "webrtc_id": webrtc_id}}
        answer = (await client.post(f"{url}/gradio_api/component_server/", json=body)).json()
        if "sdp" not in answer:
            await pc.close()
            raise RuntimeError(f"the app refused the call: {answer}")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        await asyncio.sleep(max(0.0, started + seconds - time.monotonic()))
        stop.set()
        await pc.close()
        for task in tasks:
            task.cancel()
    result.audio = np.concatenate(received) if received else result.audio
    return result


def load_48k(path: str) -> np.ndarray:
    """Any audio file -> float32 mono at 48 kHz (FFmpeg through PyAV, then soxr)."""
    import av
    import soxr

    with av.open(path) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=stream.rate)
        chunks = [f.to_ndarray().reshape(-1) for frame in container.decode(stream) for f in resampler.resample(frame)]
    return soxr.resample(np.concatenate(chunks), stream.rate, RATE).astype(np.float32)


def save_wav(path: str, pcm: np.ndarray, rate: int = RATE) -> None:
    import wave

    with wave.open(path, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(pcm, -1, 1) * 32767).astype(np.int16).tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--input", required=True, help="what the user says (any audio file)")
    parser.add_argument("--output", default="reply.wav", help="what comes back (48 kHz wav)")
    parser.add_argument("--seconds", type=float, default=None, help="call length (default: input + 3 s)")
    parser.add_argument("--voice")
    parser.add_argument("--role")
    parser.add_argument("--persona")
    args = parser.parse_args()
    pcm = load_48k(args.input)
    settings = {k: v for k, v in (("voice", args.voice), ("role", args.role), ("persona", args.persona)) if v is not None}
    result = asyncio.run(converse(args.url, pcm, args.seconds or pcm.size / RATE + 3, settings))
    save_wav(args.output, result.audio)
    summary = {"connected_after_s": result.connected_after_s, "first_audio_after_s": result.first_audio_after_s,
               "received_s": round(result.audio.size / RATE, 2), "transcript": result.transcript}
    Path(args.output).with_suffix(".json").write_text(json.dumps(summary, indent=2))
    import sys

    sys.stdout.write(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
