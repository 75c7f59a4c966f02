"""Remote: calls whose engine is a cluster (`serve.cluster`), behind the same contract as a local one.

Implements:
  * `RemoteLink`: the engine's side of one session's port, played over the `/api/chat` protocol.
    Each frame the port gives (`Port.take`) goes out as Ogg/Opus at once; each 80 ms of the model's
    audio that comes back answers the oldest frame on its way (`Port.answer`), with the text piece
    that came before it. The handshake makes the call live; a kind-5 message or a lost connection
    ends it with its reason. The caller keeps a plain `Session`: the same timeline, captions,
    recording and endings as with a local engine; the link is how its text reads (`Words`).
  * `RemoteService`: the `CallService` contract when the engines are a cluster's: its status and
    voices (polled from the cluster's `/api/status`), custom voices (sent to `/api/voices`, kept
    there for every replica), calls (`start_call` opens a link and returns once the cluster has
    taken the call, or raises its refusal) and the files calls leave (kept here, in front).
    Voice previews and offline runs need an engine of the page's own: they say so.
Nothing here imports torch: a page in front of a cluster runs in a small CPU container.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit

import numpy as np

from ..model.config import TEXT_PAD_ID
from ..runtime.audio import FrameBuffer, normalize_loudness, write_wav
from ..runtime.framing import TickGrid
from ..runtime.port import Port
from .api_chat import AUDIO, ERROR, HANDSHAKE, PROMPT_WAIT_S, TEXT, chat_query
from .contract import (
    FILES_GRACE_S,
    SAMPLE_RATE,
    AudioError,
    CallSettings,
    CustomVoice,
    EngineFigures,
    FileStore,
    OfflineResult,
    Session,
    State,
    Status,
    Summary,
    UserError,
    read_voice_clip,
    require_ready,
)

logger = logging.getLogger(__name__)

POLL_S = 2.0  # the cluster's status is asked this often
CONNECT_S = 10.0
WAKE_S = 0.5  # with nothing to send, the link still checks the call's limits this often
MAX_PIECES = 4096  # text pieces a link keeps for the captions and the recording
FIRST_PIECE_ID = 1 << 20  # a link's own ids for the pieces that come back (no token id is this high)
CONTROL_PIECE = re.compile(r"<[^>]*>")  # "<s>", "</s>", "<unk>": the tokenizer's, nobody says them
LOST = "the engine serving this call stopped (it is being replaced): start the call again"


class EngineUnavailable(UserError):
    """The cluster cannot be reached, or refused the call before it started."""


class RemoteLink:
    """One call's connection to the cluster; runs on the `RemoteService`'s event loop."""

    def __init__(self, port: Port, url: str, loop: asyncio.AbstractEventLoop) -> None:
        import sphn  # Opus as the official server's; only remote calls need it here

        self.port = port
        self.url = url
        self._loop = loop
        self._wake = asyncio.Event()
        self._writer = sphn.OpusStreamWriter(SAMPLE_RATE)
        self._reader = sphn.OpusStreamReader(SAMPLE_RATE)
        self._frames = FrameBuffer()
        self._pieces: OrderedDict[int, str] = OrderedDict()
        self._next_id = FIRST_PIECE_ID
        self._pending_text = TEXT_PAD_ID
        self._ws = None

    def caption(self, text_id: int) -> str:
        """A piece that came back, as people read it (any thread)."""
        return CONTROL_PIECE.sub("", self.piece(text_id))

    def piece(self, text_id: int) -> str:
        """A piece that came back, as the cluster sent it (any thread)."""
        return self._pieces.get(text_id, "")

    async def open(self, keep_persona: bool) -> None:
        """Connect and wait for the handshake; raises the cluster's refusal (kind 5) or why it
        cannot be reached. The call is live when this returns; it goes on in the background."""
        import websockets

        try:
            self._ws = await websockets.connect(self.url, open_timeout=CONNECT_S, max_size=2**22)
        except websockets.InvalidStatus as exc:
            code = exc.response.status_code
            why = "every engine is busy: try again in a minute" if code == 503 else f"it answered HTTP {code}"
            raise EngineUnavailable(f"the engine cluster did not take the call: {why}") from exc
        except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
            raise EngineUnavailable(f"the engine cluster cannot be reached ({type(exc).__name__}): try again later") from exc
        self.port.bind(0, 0, keep_persona, self._ring)
        try:
            first = await asyncio.wait_for(self._ws.recv(), PROMPT_WAIT_S)
        except (TimeoutError, websockets.ConnectionClosed) as exc:
            await self._ws.close()
            raise EngineUnavailable("the engine cluster closed the call before it started: try again") from exc
        if first[0] == ERROR:
            await self._ws.close()
            raise UserError(bytes(first[1:]).decode(errors="replace"))
        if first[0] != HANDSHAKE:
            await self._ws.close()
            raise EngineUnavailable(f"the engine cluster does not speak the protocol (kind {first[0]} first)")
        self.port.go_live(TickGrid(epoch=time.monotonic()))
        self._loop.create_task(self._run())

    def _ring(self) -> None:
        """The port's doorbell (any thread): a frame waits, or the call ended."""
        self._loop.call_soon_threadsafe(self._wake.set)

    async def _run(self) -> None:
        sending = asyncio.create_task(self._send())
        receiving = asyncio.create_task(self._receive())
        await asyncio.wait({sending, receiving}, return_when=asyncio.FIRST_COMPLETED)
        for task in (sending, receiving):
            task.cancel()
        await self._ws.close()
        if not self.port.ended:
            self.port.end("error", LOST)

    async def _send(self) -> None:
        """Each frame as it comes; the call's limits checked as the engine thread checks them."""
        while not self.port.ended:
            while (pcm := self.port.take(time.monotonic())) is not None:
                page = self._writer.append_pcm(pcm)
                if len(page):
                    await self._ws.send(bytes([AUDIO]) + bytes(page))
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), WAKE_S)
            except TimeoutError:
                pass
            self.port.expire()

    async def _receive(self) -> None:
        """The model's audio (in 80 ms frames, each answering the oldest on its way), its text
        pieces, and the cluster's ending."""
        import websockets

        try:
            async for message in self._ws:
                kind, payload = message[0], bytes(message[1:])
                if kind == AUDIO:
                    pcm = np.asarray(self._reader.append_bytes(payload), dtype=np.float32).reshape(-1)
                    for frame in self._frames.push(pcm):
                        self.port.answer(frame, self._pending_text)
                        self._pending_text = TEXT_PAD_ID
                elif kind == TEXT:
                    self._pending_text = self._remember(payload.decode(errors="replace"))
                elif kind == ERROR:
                    self.port.end("ended", payload.decode(errors="replace"))
        except websockets.ConnectionClosed:
            pass

    def _remember(self, piece: str) -> int:
        text_id, self._next_id = self._next_id, self._next_id + 1
        self._pieces[text_id] = piece
        while len(self._pieces) > MAX_PIECES:
            self._pieces.popitem(last=False)
        return text_id


class RemoteService:
    """The `CallService` contract for a page in front of an engine cluster (see the module docstring)."""

    has_model = False

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.netloc:
            raise ValueError(f"--engine-url takes ws://HOST:PORT/api/chat, got {url!r}")
        self.chat_url = url
        self.base_url = urlunsplit(("https" if parts.scheme == "wss" else "http", parts.netloc, "", "", ""))
        self.files = FileStore(grace_s=FILES_GRACE_S)
        self._status = Status(State.STARTING, f"asking the engine cluster at {parts.netloc}")
        self._report: dict = {}
        self._when_ready: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._links: list[RemoteLink] = []
        self._loop = asyncio.new_event_loop()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop.run_forever, name="personaplex-remote", daemon=True)

    # --- the cluster's state -------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        threading.Thread(target=self._poll, name="personaplex-remote-status", daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            links = list(self._links)
        for link in links:
            link.port.end("shutdown", "the server is shutting down")

    def when_ready(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if not self._status.ready:
                self._when_ready.append(callback)
                return
        callback()

    def wait_ready(self, timeout: float | None = None) -> Status:
        deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
        while not self._status.ready and time.monotonic() < deadline:
            time.sleep(0.1)
        return self._status

    @property
    def status(self) -> Status:
        return self._status

    def _poll(self) -> None:
        import httpx

        while not self._stopping.is_set():
            try:
                report = httpx.get(self.base_url + "/api/status", timeout=POLL_S).json()
                status = Status(State.READY, f"the engine cluster at {self.base_url}") if report.get("ready") else \
                    Status(State.LOADING, f"the engine cluster at {self.base_url} is loading")
            except (httpx.HTTPError, json.JSONDecodeError, AttributeError) as exc:
                report, status = {}, Status(State.LOADING, f"waiting for the engine cluster at {self.base_url} "
                                                           f"({type(exc).__name__})")
            with self._lock:
                first_ready = status.ready and not self._status.ready
                changed = status.message != self._status.message
                self._report, self._status = report, status
                callbacks, self._when_ready = (self._when_ready, []) if first_ready else ([], self._when_ready)
            if changed:
                logger.info("%s: %s", status.state.value, status.message)
            for callback in callbacks:
                try:
                    callback()
                except Exception:  # the page works all the same
                    logger.exception("a callback for the ready cluster failed")
            self._stopping.wait(POLL_S)

    def summary(self) -> Summary:
        s, report = self._status, self._report
        if not s.ready:
            return Summary("busy", s.state.value.capitalize(), s.message)
        engines = int(report.get("replicas", 0))
        running = f"{engines} engine{'s' * (engines != 1)} running; " if engines else ""
        return Summary(str(report.get("level", "ready")), "Ready",
                       f"calls go to the engine cluster at {self.base_url} ({running}one of them: {report.get('summary', '')})")

    def figures(self) -> EngineFigures | None:
        report = self._report
        if not report:
            return None
        return EngineFigures(int(report.get("live", 0)), int(report.get("slots", 0)), float(report.get("tick_ms", 0.0)))

    @property
    def context_s(self) -> float:
        return float(self._report.get("context_s", 240.0))

    def voice_names(self) -> list[str]:
        return [str(v) for v in self._report.get("voices", [])]

    # --- voices --------------------------------------------------------------------------------
    def add_custom_voice(self, path: str | Path, owner: str) -> CustomVoice:
        """Checked here for length, sent to the cluster (which encodes it and keeps it for every
        replica, keyed for `owner`); the clip as the model hears it is kept here to play back."""
        import httpx

        require_ready(self._status)
        pcm = read_voice_clip(path)
        try:
            answer = httpx.post(f"{self.base_url}/api/voices?{urlencode({'owner': owner})}", content=Path(path).read_bytes(),
                                timeout=60).json()
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            raise EngineUnavailable(f"the engine cluster did not take the clip ({type(exc).__name__}): try again") from exc
        if "error" in answer:
            raise AudioError(str(answer["error"]))
        clip = self.files.cached(str(answer["key"]).split(":")[-1] + ".wav")
        write_wav(clip, normalize_loudness(pcm))
        return CustomVoice(str(answer["key"]), float(answer["seconds"]), clip)

    def voice_preview(self, voice: str) -> Path:
        raise UserError("voice previews need a model on this server; this page sends its calls to an engine cluster")

    def run_offline(self, settings: CallSettings, user_pcm: np.ndarray, progress: Callable[[int, int], None] | None = None,
                    waiting: Callable[[str], None] | None = None) -> OfflineResult:
        raise UserError("the offline tab needs a model on this server; this page sends its calls to an engine cluster")

    # --- calls ---------------------------------------------------------------------------------
    def start_call(self, session: Session, settings: CallSettings) -> None:
        """Send the call to the cluster (from a thread other than the link's loop): returns once
        a replica has run the persona's prompt, or raises its refusal."""
        require_ready(self._status)
        url = f"{self.chat_url}?{urlencode(chat_query(settings))}"
        link = RemoteLink(session.port, url, self._loop)
        session.words = link
        asyncio.run_coroutine_threadsafe(link.open(settings.keep_persona), self._loop).result()
        with self._lock:
            self._links = [other for other in self._links if not other.port.ended] + [link]
