"""Talk to a running PersonaPlex Live app over WebRTC from Python, the way the browser does.

    python examples/webrtc_client.py --url http://127.0.0.1:7860 --input examples/user_question.wav \
        --output reply.wav [--voice NATF2] [--role "You enjoy having a good conversation."]

It reads the page's /config, runs the page's load event (as a browser does when it opens the
page: the app gives this page session its token there), sends an SDP offer through Gradio's
component server, answers the app's "send_input" request with the persona settings, streams the
wav as the microphone (20 ms Opus frames, in real time, then silence), records what comes back,
and follows what the page shows (who is speaking, the conversation turn by turn, the call's
figures) from the app's messages on the call's data channel; after the call it asks for the
recording's link as the page does. The call ends
after `--seconds` or when the app ends it (time limit, refusal...): a refused call (an unknown
voice, a busy server...) exits with status 2 and the app's message. Needs aiortc and httpx (both
come with fastrtc).
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import html
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
UPDATE = "personaplex"  # the app's messages on the call's data channel: what the page shows of the call


class FileTrack(MediaStreamTrack):
    """Plays float32 mono pcm at 48 kHz in real time, then silence; with `freeze_after_s`, it
    stops sending then without hanging up (a browser that froze or lost its network)."""

    kind = "audio"

    def __init__(self, pcm: np.ndarray, freeze_after_s: float | None = None) -> None:
        super().__init__()
        self.pcm = np.clip(pcm, -1, 1)
        self.sent = 0
        self.start: float | None = None
        self.freeze_after = None if freeze_after_s is None else int(freeze_after_s * RATE)

    async def recv(self) -> AudioFrame:
        if self.start is None:
            self.start = time.monotonic()
        if self.freeze_after is not None and self.sent >= self.freeze_after:
            await asyncio.Event().wait()  # never again
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
    audio: np.ndarray  # float32 mono at 48 kHz, as played by the remote track (once the call is over)
    received_samples: int = 0  # of the remote track so far, while the call goes on
    live: str = ""  # html: who is speaking, the verdict, why the call ended
    conversation: list[dict] = field(default_factory=list)  # chat messages, turn by turn
    details: str = ""  # html: the call's figures
    recording_url: str | None = None  # the call's stereo recording, offered once it ended
    transcript_url: str | None = None
    ended: str | None = None  # the app's message when it ended the call itself
    webrtc_id: str = ""
    events: list[dict] = field(default_factory=list)  # data-channel messages
    output_updates: int = 0  # page updates seen through Gradio
    output_errors: list[str] = field(default_factory=list)  # updates that could not be applied
    connected_after_s: float | None = None
    closed_by_app_after_s: float | None = None  # when the app closed the connection, if it did
    first_frame_after_s: float | None = None  # the first frame of the remote track
    first_audio_after_s: float | None = None  # the first frame that is not silence

    @property
    def refused(self) -> bool:
        return "data-ending='refused'" in self.live

    @property
    def transcript(self) -> str:
        """The conversation as text, one turn a line (the page's chat messages are html-escaped)."""
        speaker = {"assistant": "Model", "user": "You"}
        return "".join(f"{speaker.get(m['role'], m['role'])}: {html.unescape(m['content'])}\n" for m in self.conversation)


def _apply(result: CallResult, turns: dict[str, tuple[float, dict]], data: dict) -> None:
    """One update of the page's view of the call (its data-channel message "personaplex"): the
    live view, the figures, the turns that changed (keyed by speaker and start) and the ending."""
    result.live = str(data.get("live", result.live))
    result.details = str(data.get("details", result.details))
    for key, role, text in data.get("turns", []):
        turns[key] = (float(key[1:]), {"role": "assistant" if role == "bot" else "user", "content": text})
    result.conversation = [message for _, message in sorted(turns.values(), key=lambda t: t[0])]
    result.output_updates += 1


def _file_url(url: str, value: object) -> str | None:
    """The download link of a file output (a FileData dict, possibly inside an update)."""
    if isinstance(value, dict) and "value" in value:
        value = value["value"]
    if isinstance(value, dict) and value.get("url"):
        return value["url"]
    if isinstance(value, dict) and value.get("path"):
        return f"{url}/gradio_api/file={value['path']}"
    return None


class Page:
    """What the client needs from the app's /config."""

    def __init__(self, config: dict) -> None:
        components = config["components"]
        self.by_elem = {c.get("props", {}).get("elem_id"): c for c in components}
        self.webrtc = next(c["id"] for c in components if c.get("type") == "webrtc")
        deps = config["dependencies"]
        self.tick = next(d for d in deps if [self.webrtc, "tick"] in d["targets"])
        self.load = [d for d in deps if any(target[1] == "load" for target in d["targets"])]
        self.stop = next((d for d in deps if [self.webrtc, "stop_recording"] in d["targets"]), None)
        self.values = {c["id"]: c.get("props", {}).get("value") for c in components}
        self.elem_ids = {c["id"]: c.get("props", {}).get("elem_id") for c in components}

    def inputs(self, dep: dict, webrtc_id: str, overrides: dict[str, object]) -> list:
        ids = {c["id"]: key for key, c in self.by_elem.items() if key}
        data = []
        for cid in dep["inputs"]:
            if cid == self.webrtc:
                data.append({"webrtc_id": webrtc_id, "textbox": "", "audio": None})
            else:
                data.append(overrides.get(ids.get(cid, ""), self.values.get(cid)))
        return data


async def converse(url: str, user_pcm_48k: np.ndarray, seconds: float, settings: dict[str, object] | None = None,
                   answer_settings: bool = True, freeze_after_s: float | None = None,
                   result: CallResult | None = None) -> CallResult:
    """Hold a call of `seconds`, sending `user_pcm_48k` as the microphone. `settings` overrides
    input values by elem_id (persona, role, voice, consent, ...). Pass a `result` to watch the
    call while it goes on (the page's latest outputs, `received_samples`). For tests of broken clients:
    `answer_settings=False` never answers the app's request for the settings, `freeze_after_s`
    stops sending audio then without hanging up; such a client also ignores the app's end of
    the call and waits for the app to close the connection."""
    broken = not answer_settings or freeze_after_s is not None
    url = url.rstrip("/")
    settings = settings or {}
    session, webrtc_id = secrets.token_hex(6), secrets.token_hex(8)
    result = result or CallResult(audio=np.zeros(0, dtype=np.float32))
    result.webrtc_id = webrtc_id
    received: list[np.ndarray] = []
    turns: dict[str, tuple[float, dict]] = {}
    started = time.monotonic()
    ended = asyncio.Event()
    async with httpx.AsyncClient(timeout=30) as client:
        page = Page((await client.get(f"{url}/config")).json())
        await _load_page(client, url, page, session)
        pc = RTCPeerConnection()
        channel = pc.createDataChannel("text")
        pc.addTrack(FileTrack(user_pcm_48k, freeze_after_s))
        hanging_up = False
        tasks: list[asyncio.Task] = []

        async def join(dep: dict) -> str:
            body = {"data": page.inputs(dep, webrtc_id, settings), "fn_index": dep["id"], "session_hash": session,
                    "trigger_id": page.webrtc, "event_data": None}
            response = await client.post(f"{url}/gradio_api/queue/join", json=body)
            response.raise_for_status()
            return response.json()["event_id"]

        @channel.on("message")
        def on_message(message: str) -> None:
            event = json.loads(message)
            if event.get("type") == UPDATE:
                _apply(result, turns, event.get("data") or {})
                return
            result.events.append(event)
            if event.get("type") == "send_input" and answer_settings:
                tasks.append(asyncio.ensure_future(join(page.tick)))
            elif event.get("type") == "end_stream":
                result.ended = str(event.get("data"))
                if not broken:
                    ended.set()

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState == "connected" and result.connected_after_s is None:
                result.connected_after_s = time.monotonic() - started
            if pc.connectionState in ("closed", "failed") and not hanging_up and result.closed_by_app_after_s is None:
                result.closed_by_app_after_s = time.monotonic() - started
                ended.set()

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
                    result.received_samples += pcm.size
            tasks.append(asyncio.ensure_future(record()))

        await pc.setLocalDescription(await pc.createOffer())
        body = {"session_hash": session, "component_id": page.webrtc, "fn_name": "offer",
                "data": {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type, "webrtc_id": webrtc_id}}
        answer = (await client.post(f"{url}/gradio_api/component_server/", json=body)).json()
        if "sdp" not in answer:
            await pc.close()
            meta = answer.get("meta", {}) if isinstance(answer, dict) else {}
            raise RuntimeError(f"the app refused the call: {meta.get('message') or answer}")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        try:
            await asyncio.wait_for(ended.wait(), max(0.0, started + seconds - time.monotonic()))
            await asyncio.sleep(0.5)  # the last captions and the recording's link are on their way
        except TimeoutError:
            pass
        hanging_up = True
        await pc.close()
        for task in tasks:
            task.cancel()
        if page.stop is not None:  # ask for the files, as the page does once a call is over
            await _call_files(client, url, page, session, webrtc_id, result)
    result.audio = np.concatenate(received) if received else result.audio
    return result


async def _load_page(client: httpx.AsyncClient, url: str, page: Page, session: str) -> None:
    """Run the page's load events for this session, as a browser does, and wait for them."""
    for dep in page.load:
        body = {"data": [], "fn_index": dep["id"], "session_hash": session, "trigger_id": None, "event_data": None}
        (await client.post(f"{url}/gradio_api/queue/join", json=body)).raise_for_status()
    if not page.load:
        return
    async with client.stream("GET", f"{url}/gradio_api/queue/data", params={"session_hash": session}, timeout=10) as r:
        done = 0
        async for line in r.aiter_lines():
            if line.startswith("data:") and json.loads(line[5:]).get("msg") == "process_completed":
                done += 1
                if done == len(page.load):
                    return


async def _call_files(client: httpx.AsyncClient, url: str, page: Page, session: str, webrtc_id: str,
                              result: CallResult) -> None:
    assert page.stop is not None
    body = {"data": page.inputs(page.stop, webrtc_id, {}), "fn_index": page.stop["id"], "session_hash": session,
            "trigger_id": page.webrtc, "event_data": None}
    joined = await client.post(f"{url}/gradio_api/queue/join", json=body)
    joined.raise_for_status()
    event_id = joined.json()["event_id"]
    async with client.stream("GET", f"{url}/gradio_api/queue/data", params={"session_hash": session}, timeout=15) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            msg = json.loads(line[5:])
            if msg.get("msg") == "process_completed" and msg.get("event_id") == event_id:  # not the settings' event
                recording, transcript = [*msg.get("output", {}).get("data", []), None, None][:2]
                result.recording_url = _file_url(url, recording)
                result.transcript_url = _file_url(url, transcript)
                return


async def fetch(url: str) -> bytes:
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.get(url)
        response.raise_for_status()
        return response.content


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
    import sys

    if result.refused:
        sys.stderr.write(f"the app refused the call: {result.ended}\n")
        sys.exit(2)
    save_wav(args.output, result.audio)
    summary = {"connected_after_s": result.connected_after_s, "first_audio_after_s": result.first_audio_after_s,
               "received_s": round(result.audio.size / RATE, 2), "conversation": result.transcript,
               "ended_by_app": result.ended, "recording": result.recording_url}
    Path(args.output).with_suffix(".json").write_text(json.dumps(summary, indent=2))
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
