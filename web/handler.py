"""The page's live call: one fastrtc WebRTC connection, an adapter of its wire format around a `Call`.

Implements `ConversationHandler` (fastrtc's `AsyncStreamHandler`): the microphone (Opus decoded at
48 kHz, one 20 ms packet at a time) -> `HalfRate` -> `Session.push`; `Session.next_async` -> the
speaker; the call's state -> the page, on the call's own data channel (`web.call_page`: who is
speaking, the conversation turn by turn, whether the call keeps real time, and the ending with
its reason). The call's settings, slot, refusal and log lines are the `Call`'s
(`personaplex.serve.call`), as for `/api/chat`. Also `Calls` (what every connection's handler
shares) and `current_connection`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastrtc import AsyncStreamHandler
from fastrtc.utils import create_message, get_current_context

from personaplex.runtime.audio import float_to_int16, int16_to_float
from personaplex.serve import inputs
from personaplex.serve.call import Call
from personaplex.serve.contract import SAMPLE_RATE, CallService, CallSettings, Limits, Phase
from web import call_page
from web.call_page import CAPTION_TURNS, MESSAGE_TYPE, CallFigures, CallPage
from web.connections import CallConnections
from web.half_rate import HalfRate
from web.health import CallView
from web.values import CALL_INPUT_NAMES, page_settings

logger = logging.getLogger(__name__)

INPUT_RATE = 2 * SAMPLE_RATE  # the microphone as fastrtc decodes it (Opus: 48 kHz)
UPDATE_EVERY = 3  # frames between page updates (about 4 a second: who is speaking stays live)
MAX_BUFFERED = 64 * 1024  # bytes the call's channel has not sent yet beyond which an update is skipped (the next carries it)
ARGS_TIMEOUT_S = 3.0  # the page sends a call's settings within this time of connecting, or the call ends
END_STREAM_DELAY_S = 0.3  # the last captions and files reach the page before the call is closed
CLOSE_DELAY_S = 0.5  # then the browser closes its side; the server closes its own after this


@dataclass
class Calls:
    """What every connection's handler shares."""

    service: CallService
    limits: Limits
    connections: CallConnections | None = None  # who opened which call; closes one the app ends


class ConversationHandler(AsyncStreamHandler):
    """One WebRTC connection (see the module docstring)."""

    def __init__(self, calls: Calls) -> None:
        # Input at Opus's own 48 kHz: fastrtc then hands over each 20 ms packet as it comes (at
        # 24 kHz its resampler would hold two back: 40 ms chunks, 20 ms later); HalfRate makes 24 kHz.
        super().__init__(expected_layout="mono", output_sample_rate=SAMPLE_RATE, input_sample_rate=INPUT_RATE)
        self._half_rate = HalfRate()
        self.calls = calls
        self.call = Call(calls.service, calls.limits, "call ?")
        self.session = self.call.session
        self.view = CallView(max_turns=CAPTION_TURNS)
        self.page = CallPage()
        self.owner: str | None = None
        self.call_id: str | None = None
        self._since_update = 0
        self._finished = False  # the ending was shown; the stream is closing

    def copy(self) -> ConversationHandler:
        return ConversationHandler(self.calls)

    async def start_up(self) -> None:
        self.call_id = current_connection()
        self.call.name = f"call {(self.call_id or '?')[:8]}"
        try:
            await asyncio.wait_for(self.wait_for_args(), ARGS_TIMEOUT_S)
        except TimeoutError:
            self.call.refuse("the page did not send the call's settings (a setting was refused?): reload the page and try again")
            return
        await self.call.start(self._settings)

    async def _settings(self) -> CallSettings:
        """The page's values, checked (any JSON may arrive); the call is recorded for its page."""
        values = self._named_args()
        self.owner = values["owner"] if isinstance(values["owner"], str) else None
        settings = page_settings(values)
        inputs.flag("the mute switch", values["mute"])
        if self.owner:
            self.session.record_to(self.calls.service.files.recording(self.owner, self.call_id))
        return settings

    async def receive(self, frame: tuple[int, np.ndarray]) -> None:
        rate, samples = frame
        assert rate == INPUT_RATE, f"fastrtc sent {rate} Hz, the handler asked for {INPUT_RATE}"
        pcm = self._half_rate.push(int16_to_float(samples.reshape(-1)))
        self.session.push(np.zeros_like(pcm) if self._muted() else pcm)

    async def emit(self):
        if self._finished:
            await asyncio.sleep(0.05)
            return None
        out = await self.session.next_async(0.05)
        if out is not None:
            self.view.add(out)
            self._since_update += 1
            if self._since_update >= UPDATE_EVERY and self._send_update():
                self._since_update = 0
            return SAMPLE_RATE, float_to_int16(out.pcm)[None]
        if self.session.ending is not None:
            await self._finish()
        return None

    async def shutdown(self) -> None:
        """The connection closed (the user stopped, or the browser went away)."""
        self.session.end("stopped", "the call was stopped")
        await self.call.close()

    # --- endings ---------------------------------------------------------------------------
    async def _finish(self) -> None:
        """The session ended on its own (time limit, idle, refusal, error): show why (the page
        then fetches what the call left), end the stream and close the connection."""
        self._finished = True
        ending = await self.call.close()
        self._send_update(final=True)
        asyncio.get_running_loop().call_later(END_STREAM_DELAY_S, self._end_stream, ending.message)

    def _end_stream(self, message: str) -> None:
        """fastrtc's page stops the call on this message; the connection is closed after it in any case."""
        try:
            self._send("end_stream", message)
        finally:
            asyncio.get_running_loop().call_later(CLOSE_DELAY_S, lambda: asyncio.ensure_future(self._close_connection()))

    async def _close_connection(self) -> None:
        if self.calls.connections is not None:
            await self.calls.connections.close(self.call_id)  # frees the connection's place now, not after ICE gives up

    # --- what the page shows ---------------------------------------------------------------
    def _named_args(self) -> dict[str, Any]:
        """The page's values, by name (fastrtc puts the stream's inputs last, in their order)."""
        return dict(zip(CALL_INPUT_NAMES, self.latest_args[-len(CALL_INPUT_NAMES):], strict=True))

    def _muted(self) -> bool:
        """The page's mute switch, read live (fastrtc updates the values when it changes)."""
        if not isinstance(self.latest_args, list) or len(self.latest_args) < len(CALL_INPUT_NAMES):
            return False
        return self._named_args()["mute"] is True

    def _send_update(self, final: bool = False) -> bool:
        """The call's view to the page, if the channel is open and has taken the last ones."""
        channel = self.channel
        if channel is None or channel.readyState != "open" or (channel.bufferedAmount > MAX_BUFFERED and not final):
            return False
        now = asyncio.get_running_loop().time()
        service, connections = self.calls.service, self.calls.connections
        figures = service.figures()
        tick_ms = figures.tick_ms if figures is not None else 0.0
        if self.session.phase is Phase.LIVE:
            self.view.update_verdict(self.session.elapsed_s, self.session.stats, tick_ms)
        state = connections.state(self.call_id) if connections is not None else "closed"
        data = self.page.update(self.view, self.session, CallFigures(tick_ms, state, service.context_s), now, final)
        if self._send(MESSAGE_TYPE, data):
            self.page.sent(data, now)
            return True
        return False

    def _send(self, kind: str, data: Any) -> bool:
        channel = self.channel
        if channel is None or channel.readyState != "open":
            return False
        try:
            channel.send(call_page.encode(data) if kind == MESSAGE_TYPE else create_message(kind, data))
        except Exception as exc:  # the channel closed meanwhile: the page is gone
            logger.info("%s: the page's channel refused a message: %s", self.call.name, type(exc).__name__)
            return False
        return True


def current_connection() -> str | None:
    """The id of the WebRTC connection whose task this is (fastrtc's context), if any."""
    try:
        return get_current_context().webrtc_id
    except RuntimeError:  # not inside a connection's task
        return None
