"""Talk to PersonaPlex over the Moshi/PersonaPlex WebSocket protocol (`/api/chat`) from Python.

    python examples/chat_client.py --url ws://127.0.0.1:7860/api/chat --input examples/user_question.wav \
        --output reply.wav [--voice NATF2] [--role "You enjoy having a good conversation."] [--seconds 12]

It connects with the persona in the query (as NVIDIA's web client does), waits for the handshake
(the server sends it once the persona's prompt has run), streams the wav as the microphone in
real time (Ogg/Opus at 24 kHz, 40 ms a page), then silence until `--seconds`, and keeps what
comes back: the model's audio (written to `--output`) and its text pieces. It prints a JSON
summary. A refused call (an unknown voice, a bad value, a busy server, the model still loading)
exits with status 2 and the server's message. Needs `websockets` and `sphn` (both installed with
the app).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import sphn
import websockets

RATE = 24_000
CHUNK = 960  # 40 ms: two 20 ms Opus frames a page, as NVIDIA's web client sends them
HANDSHAKE, AUDIO, TEXT, ERROR = 0, 1, 2, 5
TAIL_S = 0.6  # after the last chunk, the model's answer to it is still on its way


@dataclass
class CallResult:
    handshake_s: float | None = None  # from connecting to the handshake
    audio: list[np.ndarray] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    error: str | None = None  # the server's kind-5 message
    closed: str = ""  # how the connection ended

    @property
    def seconds(self) -> float:
        return sum(a.size for a in self.audio) / RATE

    def summary(self) -> dict:
        return {"handshake_s": self.handshake_s, "audio_s": round(self.seconds, 2), "text": "".join(self.text),
                "error": self.error, "closed": self.closed}


async def talk(url: str, query: dict[str, str], pcm: np.ndarray, seconds: float) -> CallResult:
    """One call: `pcm` (float32 mono at 24 kHz) as the microphone for `seconds`."""
    result = CallResult()
    start = time.monotonic()
    async with websockets.connect(f"{url}?{urlencode(query)}", max_size=None) as ws:
        first = await ws.recv()
        if first[0] == ERROR:
            result.error = bytes(first[1:]).decode()
            return result
        assert first[0] == HANDSHAKE, f"expected the handshake, got kind {first[0]}"
        result.handshake_s = round(time.monotonic() - start, 3)
        receiving = asyncio.create_task(_receive(ws, result))
        await _stream(ws, pcm, seconds, receiving)
        if not receiving.done():
            await asyncio.sleep(TAIL_S)
            await ws.close()
        await receiving
    return result


async def _stream(ws, pcm: np.ndarray, seconds: float, receiving: asyncio.Task) -> None:
    """The microphone: `pcm`, then silence, in real time, until `seconds` or the server ends."""
    writer = sphn.OpusStreamWriter(RATE)
    total = int(seconds * RATE)
    audio = np.zeros(total + CHUNK, dtype=np.float32)
    audio[: min(pcm.size, total)] = pcm[:total]
    began = time.monotonic()
    for sent in range(0, total, CHUNK):
        if receiving.done():  # the server ended the call
            return
        page = writer.append_pcm(audio[sent : sent + CHUNK])
        if len(page):
            try:
                await ws.send(bytes([AUDIO]) + bytes(page))
            except websockets.ConnectionClosed:
                return
        await asyncio.sleep(max(0.0, began + (sent + CHUNK) / RATE - time.monotonic()))


async def _receive(ws, result: CallResult) -> None:
    reader = sphn.OpusStreamReader(RATE)
    try:
        async for message in ws:
            kind, payload = message[0], bytes(message[1:])
            if kind == AUDIO:
                pcm = np.asarray(reader.append_bytes(payload), dtype=np.float32).reshape(-1)
                if pcm.size:
                    result.audio.append(pcm)
            elif kind == TEXT:
                result.text.append(payload.decode())
            elif kind == ERROR:
                result.error = payload.decode()
    except websockets.ConnectionClosed as closed:
        result.closed = f"{closed.rcvd.code if closed.rcvd else ''} {closed.rcvd.reason if closed.rcvd else ''}".strip()
        return
    result.closed = f"{ws.close_code} {ws.close_reason or ''}".strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:7860/api/chat")
    parser.add_argument("--input", type=Path, default=Path(__file__).parent / "user_question.wav")
    parser.add_argument("--output", type=Path, help="where to write the model's audio (wav)")
    parser.add_argument("--voice", default="NATF2", help="a release voice: NATF2, or NATF2.pt as the official client sends it")
    parser.add_argument("--role", default="", help="the role prompt (empty: the server's default)")
    parser.add_argument("--seed", type=int, default=-1)
    parser.add_argument("--seconds", type=float, default=12.0)
    args = parser.parse_args()
    pcm, _ = sphn.read(str(args.input), sample_rate=RATE)
    query = {"text_prompt": args.role, "voice_prompt": args.voice, "seed": str(args.seed)}
    result = asyncio.run(talk(args.url, query, pcm.mean(axis=0).astype(np.float32), args.seconds))
    if args.output is not None and result.audio:
        sphn.write_wav(str(args.output), np.concatenate(result.audio)[None], RATE)
    sys.stdout.write(json.dumps(result.summary(), indent=2) + "\n")
    if result.handshake_s is None:
        sys.exit(2)


if __name__ == "__main__":
    main()
