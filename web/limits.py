"""Request sizes bounded at the door, before Gradio reads a byte of the body.

Implements `RequestLimits`, an ASGI middleware in front of the whole app:
  * every POST but an upload carries a few values (an event's settings, a WebRTC offer): a body
    over `json_bytes` is refused with 413 before it is read. Gradio keeps the values of every
    event it runs, so a 10 MB "voice name" must never get in;
  * uploads (`/upload`, `/process_recording`): each client may send `upload_bytes` in any
    `window_s` (429 beyond it), and nobody may while the disk that holds them has less than
    `disk_reserve` free (507). The client is the peer's address, or with `trust_proxy` (a
    Space, behind Hugging Face's proxy) the last address of `X-Forwarded-For`, the one the
    proxy saw;
  * a POST to these routes must declare its length (411 otherwise), and may not send more than
    it declared: the limits are checked before anything is read.
Each refusal is a JSON `{"detail": message}` that says what to do, as Gradio's own are; the
refused body is read and dropped (up to `DRAIN_BYTES`), so that the client gets to read it.
"""

from __future__ import annotations

import collections
import json
import logging
import shutil
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

UPLOAD_ROUTES = ("/upload", "/process_recording")
MB = 1024 * 1024
DRAIN_BYTES = 128 * MB  # of a refused body, read and dropped so that the client reads the refusal


@dataclass(frozen=True)
class RequestSizes:
    json_bytes: int = 256 * 1024  # an event's values: the role prompt is 1000 characters
    upload_bytes: int = 200 * MB  # per client and window: two long recordings for the offline tab
    window_s: float = 600.0
    disk_reserve: int = 2 * 1024 * MB  # free space kept on the disk of the uploads
    trust_proxy: bool = False


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class UploadBudget:
    """Bytes each client uploaded in the last `window_s` (thread-safe; old entries forgotten)."""

    def __init__(self, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window_s, self._clock = limit, window_s, clock
        self._sent: dict[str, collections.deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def charge(self, client: str, size: int) -> None:
        """Count `size` bytes against `client`, or raise `Refused` if that is more than it has left."""
        now = self._clock()
        with self._lock:
            self._forget(now)
            sent = self._sent.setdefault(client, collections.deque())
            used = sum(n for _, n in sent)
            if used + size > self.limit:
                wait = int(sent[0][0] + self.window_s - now) + 1 if sent else int(self.window_s)
                raise Refused(429, f"too much uploaded from your address: at most {self.limit // MB} MB every "
                                   f"{self.window_s / 60:g} minutes; try again in {wait // 60 + 1} minutes")
            sent.append((now, size))

    def _forget(self, now: float) -> None:
        for client in list(self._sent):
            sent = self._sent[client]
            while sent and sent[0][0] <= now - self.window_s:
                sent.popleft()
            if not sent:
                del self._sent[client]


class RequestLimits:
    """The ASGI middleware (see the module docstring). `upload_dir` says where uploads land."""

    def __init__(self, app: ASGIApp, limits: RequestSizes, upload_dir: Callable[[], Path]) -> None:
        self.app = app
        self.limits = limits
        self.upload_dir = upload_dir
        self.budget = UploadBudget(limits.upload_bytes, limits.window_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        try:
            declared = self._check(scope)
        except Refused as refused:
            logger.info("refused %s %s from %s: %s", scope.get("method"), scope.get("path"), client_of(scope, False),
                        refused.message)
            await _drain(receive)
            await _refuse(send, refused)
            return
        await self.app(scope, _at_most(receive, declared), send)

    def _check(self, scope: Scope) -> int:
        """The body's declared length, once it is allowed."""
        length = _header(scope, b"content-length")
        if length is None or not length.isdigit():
            raise Refused(411, "the request must say how long it is (Content-Length)")
        size = int(length)
        path = scope.get("path", "").rstrip("/")
        if not path.endswith(UPLOAD_ROUTES):
            if size > self.limits.json_bytes:
                raise Refused(413, f"the request is {size // 1024} KB; requests with values are limited to "
                                   f"{self.limits.json_bytes // 1024} KB (upload files instead)")
            return size
        free = _free_bytes(self.upload_dir())
        if free - size < self.limits.disk_reserve:
            raise Refused(507, "the server is short of disk space for uploads; try again later")
        self.budget.charge(client_of(scope, self.limits.trust_proxy), size)
        return size


def client_of(scope: Scope, trust_proxy: bool) -> str:
    """Who sent the request: the proxy's view of it when there is a trusted one."""
    if trust_proxy and (forwarded := _header(scope, b"x-forwarded-for")):
        return forwarded.split(",")[-1].strip()[:64]
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _free_bytes(folder: Path) -> int:
    for candidate in (folder, *folder.parents):  # the folder may not exist yet
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return 0


def _at_most(receive: Receive, declared: int) -> Receive:
    """The body as sent, cut off (the client treated as gone) past its declared length."""
    seen = 0

    async def bounded() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > declared:
                return {"type": "http.disconnect"}
        return message

    return bounded


async def _drain(receive: Receive) -> None:
    """Read a refused body and drop it (nothing is kept): a server that closes while the client
    still sends gets its answer lost in a reset; a body over `DRAIN_BYTES` is cut off instead."""
    seen = 0
    while seen <= DRAIN_BYTES:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return
        seen += len(message.get("body", b""))


async def _refuse(send: Send, refused: Refused) -> None:
    body = json.dumps({"detail": refused.message}).encode()
    await send({"type": "http.response.start", "status": refused.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
