"""Who may open and steer each WebRTC call, and how long opening one may take.

Implements `CallConnections`, which takes the place of the fastrtc component's own doors:
  * `offer` (the component's server function): the offer's shape is checked; its call id is
    bound to the page (Gradio session) that sent it, and from then on ICE candidates, settings
    and the mute switch for that id are taken from that page only. A connection that has not
    connected within `connect_s` is closed, and when `max_opening` are still opening, the
    oldest of them makes room: offers whose ICE never completes cannot keep callers out (fastrtc
    holds each for 30 s and counts it against its limit). A connection limit reached is said in
    words (`meta.message`), and an offer aiortc cannot read leaves nothing behind (fastrtc kept
    its connection, and its place, forever);
  * `set_input` (in place of fastrtc's input events): a page's values reach its own call only;
  * `state`, `close`: a call's connection, for the call's handler.
This module is the one place that knows fastrtc's internals (`pcs`, `handle_offer`, `set_input`,
`clean_up`); it must be installed before the component's `stream` registers its events.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr
from fastrtc import WebRTC

logger = logging.getLogger(__name__)

CONNECT_S = 5.0  # an offer must connect within this (a browser on loopback takes 0.3 s, over TURN 1 to 2 s)
MAX_OPENING = 8  # connections still opening at once; a new offer closes the oldest beyond this
MAX_SDP_CHARS = 64 * 1024
MAX_CANDIDATE_CHARS = 2048
CALL_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass
class _Call:
    page: str  # the Gradio session hash of the page that sent the offer
    opened: float
    connected: bool = False


def failed(error: str, message: str, **meta: Any) -> dict[str, Any]:
    """A refused offer, as fastrtc's page reads it (`error`), with what a person should read."""
    return {"status": "failed", "meta": {"error": error, "message": message, **meta}}


class CallConnections:
    def __init__(self, component: WebRTC, connect_s: float = CONNECT_S, max_opening: int = MAX_OPENING,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.component = component
        self.connect_s = connect_s
        self.max_opening = max_opening
        self._clock = clock
        self._calls: dict[str, _Call] = {}
        self._closing: set[asyncio.Task] = set()  # closes under way (kept: the loop holds tasks weakly)

    def install(self) -> None:
        """Put these doors in place of the component's own (before its `stream` is set up)."""
        self.component.offer = _server_function(self.offer)  # type: ignore[method-assign]
        self.component.quit_output_stream = _server_function(self._no_output_stream)  # type: ignore[method-assign]
        self.component.set_input_gradio = self.set_input  # type: ignore[method-assign]
        self.component.set_input_on_submit = self.set_input  # type: ignore[method-assign]

    # --- the doors ----------------------------------------------------------------------
    async def offer(self, body: Any, request: Any) -> Any:
        page = await _page_of(request)
        if not isinstance(body, dict) or not _is_call_id(body.get("webrtc_id")) or page is None:
            return failed("bad_request", "the call's offer is malformed: reload the page and try again")
        call_id = body["webrtc_id"]
        if body.get("type") == "ice-candidate":
            return await self._candidate(call_id, page, body)
        if body.get("type") != "offer" or not isinstance(body.get("sdp"), str) or len(body["sdp"]) > MAX_SDP_CHARS:
            return failed("bad_request", "the call's offer is malformed: reload the page and try again")
        if call_id in self._calls or call_id in self.component.pcs:
            return failed("connection_already_exists", "this call is already connected")
        await self._make_room()
        limit = self.component.concurrency_limit or 1
        if len(self.component.pcs) >= limit:
            logger.info("offer %s refused: %d connections open", call_id[:8], limit)
            return failed("concurrency_limit_reached", f"all {limit} connections are in use: try again in a minute",
                          limit=limit)
        self._calls[call_id] = _Call(page, self._clock())
        try:
            answer = await self.component.handle_offer(body, self.component.set_additional_outputs(call_id))
        except Exception as exc:  # aiortc could not read the offer: nothing of it may stay
            self._calls.pop(call_id, None)
            await self.close(call_id)
            self.component.clean_up(call_id)
            logger.info("offer %s refused: %s: %s", call_id[:8], type(exc).__name__, str(exc)[:200])
            return failed("bad_offer", "the browser's offer could not be read: reload the page and try again")
        self._watch(call_id)
        return answer

    def set_input(self, request: gr.Request, webrtc_value: Any, *values: Any) -> None:
        """The page's values for its call (settings, the mute switch); another page's are dropped."""
        call_id = getattr(webrtc_value, "webrtc_id", webrtc_value)
        if isinstance(call_id, str) and self.owns(call_id, getattr(request, "session_hash", None)):
            self.component.set_input(call_id, webrtc_value, *values)

    async def _candidate(self, call_id: str, page: str, body: dict) -> Any:
        candidate = body.get("candidate")
        if not self.owns(call_id, page):
            return failed("unknown_connection", "no such call")
        if not isinstance(candidate, dict) or len(str(candidate.get("candidate", ""))) > MAX_CANDIDATE_CHARS:
            return failed("bad_request", "the ICE candidate is malformed")
        return await self.component.handle_offer(body, self.component.set_additional_outputs(call_id))

    async def _no_output_stream(self, body: Any, request: Any) -> dict[str, bool]:
        """The page's updates travel on the call's own data channel: there is no stream to quit."""
        return {"success": True}

    # --- the calls ----------------------------------------------------------------------
    def owns(self, call_id: str, page: Any) -> bool:
        call = self._calls.get(call_id)
        return call is not None and isinstance(page, str) and secrets.compare_digest(call.page, page)

    def state(self, call_id: str | None) -> str:
        """The call's connection state, as aiortc names it ("closed" once it is gone)."""
        pc = self.component.pcs.get(call_id) if call_id else None
        return pc.connectionState if pc is not None else "closed"

    async def close(self, call_id: str | None) -> None:
        """Close the call's connection now (fastrtc then frees its place and shuts the handler down)."""
        pc = self.component.pcs.get(call_id) if call_id else None
        if pc is not None:
            await pc.close()
            self.component.pcs.pop(call_id, None)  # its place is free now (fastrtc's own clean-up follows)

    def _watch(self, call_id: str) -> None:
        pc = self.component.pcs.get(call_id)
        call = self._calls.get(call_id)
        if pc is None or call is None:
            return

        @pc.on("connectionstatechange")
        def changed() -> None:
            if pc.connectionState == "connected":
                call.connected = True
            elif pc.connectionState in ("closed", "failed") and self._calls.get(call_id) is call:
                del self._calls[call_id]

        asyncio.get_running_loop().call_later(self.connect_s, self._expire, call_id, call)

    def _expire(self, call_id: str, call: _Call) -> None:
        if self._calls.get(call_id) is call and not call.connected:
            logger.info("call %s: closed, it did not connect within %g s", call_id[:8], self.connect_s)
            task = asyncio.ensure_future(self.close(call_id))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _make_room(self) -> None:
        """Close the oldest connections still opening until fewer than `max_opening` are."""
        opening = sorted((c.opened, call_id) for call_id, c in self._calls.items() if not c.connected)
        for _, call_id in opening[: max(0, len(opening) - self.max_opening + 1)]:
            logger.info("call %s: closed to make room, it was still connecting", call_id[:8])
            self._calls.pop(call_id, None)
            await self.close(call_id)


def _is_call_id(value: Any) -> bool:
    return isinstance(value, str) and CALL_ID.fullmatch(value) is not None


async def _page_of(request: Any) -> str | None:
    """The Gradio session of a component-server request: Gradio hands its server functions the
    Starlette request, whose JSON body it has read (and Starlette cached) already."""
    try:
        body = await request.json()
    except Exception:
        return None
    page = body.get("session_hash") if isinstance(body, dict) else None
    return page if isinstance(page, str) and 0 < len(page) <= 128 else None


def _server_function(fn: Callable[[Any, Any], Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """`fn` as a Gradio component server function (Gradio passes the request to the parameter
    annotated `gr.Request`)."""

    async def call(body: Any, request: gr.Request) -> Any:
        return await fn(body, request)

    call._is_server_fn = True  # type: ignore[attr-defined]
    call.__name__ = fn.__name__.lstrip("_")
    return call
