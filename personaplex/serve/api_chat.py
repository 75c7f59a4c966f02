"""The Moshi/PersonaPlex WebSocket protocol at `/api/chat`: the door every existing client knows.

Implements:
  * `ChatDoor`: the WebSocket endpoint (Starlette), on the page's own server (`app.py`) and on
    each engine replica of a cluster (`serve.cluster`). Each connection is one `Call`
    (`serve.call`), this module being only its wire format: the client's Opus pages ->
    `Session.push`; `Session.next_async` -> Opus pages and text pieces; the call's ending -> an
    error message with its reason, then the close. The call's rules (one 80 ms frame out per
    80 ms in, the time limit, the idle timeout, busy) are the session's and the service's, as for
    a WebRTC call.
  * `chat_settings`: the query (`text_prompt`, `voice_prompt`, `seed`, `text_temperature`,
    `text_topk`, `audio_temperature`, `audio_topk`; ours also `greedy` and `keep_persona`, which
    a page in front of a cluster sends: `chat_query`) -> `CallSettings`, checked as the page
    checks its values; what the official clients also send and the official server ignores is
    ignored here too.

The protocol (kyutai-labs/moshi `rust/protocol.md`; NVIDIA/personaplex `moshi/server.py`): binary
messages whose first byte is the kind. 0: the handshake, sent once the persona's prompt has run;
1: Ogg/Opus audio at 24 kHz, both ways; 2: a text piece of the model (UTF-8, "▁" as a space);
5: an error (UTF-8), after which the server closes; 3, 4 and 6 (control, metadata, ping) and
unknown kinds are ignored and never end a call. Opus is `sphn`'s, as in the official server.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from . import inputs
from .call import Call
from .contract import (
    CUSTOM_VOICE_PREFIX,
    DEFAULT_TEXT_PROMPT,
    MAX_VOICE_NAME_CHARS,
    SAMPLE_RATE,
    CallService,
    CallSettings,
    Limits,
    SamplingParams,
    SettingsError,
)

logger = logging.getLogger(__name__)

PATH = "/api/chat"
HANDSHAKE, AUDIO, TEXT, ERROR = 0, 1, 2, 5
PROMPT_WAIT_S = 120.0  # the persona's prompt runs within this, or the call ends
NEXT_WAIT_S = 0.1
MAX_REASON_BYTES = 120  # a WebSocket close reason holds at most 123 bytes
SAMPLING_QUERY = {  # query parameter -> (the page's name for it, its default)
    "text_temperature": ("temp_text", SamplingParams.temp_text),
    "text_topk": ("topk_text", SamplingParams.topk_text),
    "audio_temperature": ("temp_audio", SamplingParams.temp_audio),
    "audio_topk": ("topk_audio", SamplingParams.topk_audio),
}


def chat_settings(query: Mapping[str, str], voices: list[str], default_voice: str,
                  custom: bool = False) -> CallSettings:
    """A call's settings from a connection's query. A voice is one of `voices`, by name or as
    the official clients send it (`NATF2.pt`), or with `custom` a custom voice's key: never a
    path. An empty role is the default; the persona is kept unless `keep_persona=false`."""
    role = inputs.text("text_prompt", query.get("text_prompt")).strip() or DEFAULT_TEXT_PROMPT
    voice = chat_voice(query.get("voice_prompt"), voices, default_voice, custom)
    values = {name: _query_number(name, query[key]) if key in query else default
              for key, (name, default) in SAMPLING_QUERY.items()}
    seed = _query_number("seed", query["seed"]) if "seed" in query else inputs.RANDOM_SEED
    greedy = query.get("greedy", "false")  # ours: the official clients do not send it
    sampling = inputs.sampling_settings(values["temp_text"], values["topk_text"], values["temp_audio"],
                                        values["topk_audio"], seed, greedy)
    keep = inputs.flag("keep_persona", query.get("keep_persona", "true"))  # ours, like greedy
    return CallSettings(voice, role, sampling, keep)


def chat_query(settings: CallSettings) -> dict[str, str]:
    """A call's settings as the query `chat_settings` reads (what a page in front of a cluster sends)."""
    sampling = settings.sampling
    return {"text_prompt": settings.role, "voice_prompt": settings.voice, "seed": str(sampling.seed),
            "greedy": str(sampling.greedy).lower(), "text_temperature": str(sampling.temp_text),
            "text_topk": str(sampling.topk_text), "audio_temperature": str(sampling.temp_audio),
            "audio_topk": str(sampling.topk_audio), "keep_persona": str(settings.keep_persona).lower()}


def chat_voice(value: str | None, voices: list[str], default_voice: str, custom: bool = False) -> str:
    """A release voice by name (`NATF2`) or file name (`NATF2.pt`), or with `custom` a custom
    voice's key (`custom:` and 32 hex digits); anything else is refused."""
    if not value:  # the page's default persona's voice, or the checkpoint's first
        return default_voice if default_voice in voices or not voices else voices[0]
    name = inputs.text("voice_prompt", value, max_chars=MAX_VOICE_NAME_CHARS)
    if custom and re.fullmatch(re.escape(CUSTOM_VOICE_PREFIX) + "[0-9a-f]{32}", name):
        return name
    name = name[: -len(".pt")] if name.lower().endswith(".pt") else name
    if voices and name not in voices:  # (no voices yet: the model is loading, and the service says so)
        shown = name if name.isalnum() else repr(name)
        raise SettingsError(f"unknown voice {shown}: voice_prompt takes one of {', '.join(voices)} (or NAME.pt)")
    return name


def _query_number(name: str, text: str) -> Any:
    """A query value as the number it spells (int, else float); as given if it is none, for
    `serve.inputs` to say what is wrong with it."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


class ChatDoor:
    """The `/api/chat` endpoint: one call per connection."""

    def __init__(self, service: CallService, limits: Limits, default_voice: str,
                 custom_voice: Callable[[str], Awaitable[None]] | None = None, busy: str | None = None) -> None:
        """`custom_voice`: makes a custom voice's key usable here before a call with it starts
        (a cluster's replica fetches the clip from its store); None: no custom voices. `busy`:
        what a caller is told when every slot is taken (default: the engine's own words)."""
        self.busy = busy
        self.service = service
        self.limits = limits
        self.default_voice = default_voice
        self.custom_voice = custom_voice

    async def serve(self, websocket: WebSocket) -> None:
        """The endpoint (`starlette.routing.WebSocketRoute(PATH, door.serve)`)."""
        await websocket.accept()
        await ChatConnection(websocket, self).run()


class ChatConnection:
    """One connection's call in the protocol's wire format: Opus both ways, text pieces, kind 5."""

    def __init__(self, websocket: WebSocket, door: ChatDoor) -> None:
        import sphn  # the official server's Opus (Ogg pages both ways); only a WebSocket call needs it

        self.ws = websocket
        self.door = door
        self.call = Call(door.service, door.limits, f"chat {secrets.token_hex(4)}", busy=door.busy)
        self.session = self.call.session
        self.reader = sphn.OpusStreamReader(SAMPLE_RATE)
        self.writer = sphn.OpusStreamWriter(SAMPLE_RATE)

    async def run(self) -> None:
        receiving: asyncio.Task | None = None
        try:
            if not await self.call.start(self._settings):
                return
            receiving = asyncio.create_task(self._receive())
            if await self.session.until_live(PROMPT_WAIT_S):
                await self.ws.send_bytes(bytes([HANDSHAKE]))
                await self._send()
            elif self.session.ending is None:
                self.session.end("error", f"the persona's prompt did not load within {PROMPT_WAIT_S:g} s")
        except (WebSocketDisconnect, RuntimeError, OSError):  # the client went away while we sent
            self.session.end("stopped", "the client closed the connection")
        except Exception as exc:  # the connection's boundary: a fault, said to the client and logged once
            logger.exception("%s: failed", self.call.name)
            self.session.end("error", f"the call failed: {type(exc).__name__}")
        finally:
            self.session.end("stopped", "the client closed the connection")
            if receiving is not None:
                receiving.cancel()
            await self._finish()

    async def _settings(self) -> CallSettings:
        """The query's settings, and a custom voice made usable here first."""
        door, custom = self.door, self.door.custom_voice
        settings = chat_settings(self.ws.query_params, door.service.voice_names(), door.default_voice, custom is not None)
        if custom is not None and settings.voice.startswith(CUSTOM_VOICE_PREFIX):
            await custom(settings.voice)
        return settings

    async def _receive(self) -> None:
        """The client's messages: audio goes to the session; any other kind is ignored."""
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                self.session.end("stopped", "the client closed the connection")
                return
            data = message.get("bytes")
            if not data or data[0] != AUDIO:
                continue  # text frames, ping, control, metadata, unknown kinds: never an ending
            try:
                pcm = self.reader.append_bytes(data[1:])
            except Exception as exc:  # not Ogg/Opus: the call cannot hear this client
                self.session.end("refused", f"the audio is not Ogg/Opus at 24 kHz ({type(exc).__name__})")
                return
            self.session.push(np.asarray(pcm, dtype=np.float32).reshape(-1))

    async def _send(self) -> None:
        """The model's audio and text, frame by frame, until the call ends."""
        while True:
            out = await self.session.next_async(NEXT_WAIT_S)
            if out is None:
                if self.session.ending is not None:
                    return
                continue
            piece = self.session.words.piece(out.text_id) if out.text_id is not None else ""
            if piece:  # before the frame's audio, as the official server's come (a client pairs them so)
                await self.ws.send_bytes(bytes([TEXT]) + piece.encode())
            audio = self.writer.append_pcm(out.pcm)
            if len(audio):
                await self.ws.send_bytes(bytes([AUDIO]) + bytes(audio))

    async def _finish(self) -> None:
        """Say why the call ended (unless the client ended it), close, and log it once."""
        ending = await self.call.close()
        if self.ws.client_state is not WebSocketState.CONNECTED or ending.reason == "stopped":
            return
        try:
            await self.ws.send_bytes(bytes([ERROR]) + ending.message.encode())
            reason = ending.message.encode()[:MAX_REASON_BYTES].decode(errors="ignore")
            await self.ws.close(code=1000, reason=reason)
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # gone meanwhile
