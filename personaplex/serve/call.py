"""One call through a door, the same through every door: its settings, a slot or a refusal, its
ending, and one log line of each.

Implements `Call`. A door (the page's WebRTC handler, `web/handler.py`; the WebSocket protocol,
`api_chat.py`) makes one per connection and only turns its wire format into the call's:
  * `start(settings)`: the door's settings (a coroutine: reading them may refuse them, or fetch a
    custom voice first) -> a slot from the service (True), or the refusal, said as the call's
    ending and logged in one line (False); an unexpected fault ends the call with "error" and is
    logged with its traceback;
  * `session`: the call's timeline (`push`, `next_async`, `end`, its figures);
  * `close()`: the recording finished; the ending logged once (a refusal was logged already).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from ..runtime.transcript import clock_text
from .contract import Busy, CallService, CallSettings, Ending, Limits, Phase, Session, UserError

logger = logging.getLogger("personaplex.call")

LOGGED_CHARS = 300  # of a refusal's reason in the log


class Call:
    def __init__(self, service: CallService, limits: Limits, name: str, busy: str | None = None) -> None:
        """`name`: how the log calls it ("call 3f2a..."); `busy`: what a caller hears when every
        slot is taken (default: the engine's own words)."""
        self.service = service
        self.session = Session(limits)
        self.name = name
        self.busy = busy
        self._logged = False

    async def start(self, settings: Callable[[], Awaitable[CallSettings]]) -> bool:
        """Read the settings and take a slot; False if the call was refused (or failed) instead."""
        try:
            chosen = await settings()
            await asyncio.to_thread(self.service.start_call, self.session, chosen)
        except UserError as exc:
            self.refuse(self.busy if isinstance(exc, Busy) and self.busy else str(exc))
            return False
        except Exception as exc:  # the call's boundary: a fault, said to the caller and logged once
            logger.exception("%s: could not start", self.name)
            self.session.end("error", f"the call could not start: {exc}")
            return False
        logger.info("%s: started with voice %s", self.name, chosen.voice)
        return True

    def refuse(self, reason: str) -> None:
        """End the call before it started, saying why (logged unless the caller hung up first)."""
        if self.session.phase is not Phase.ENDED:
            logger.info("%s: refused: %s", self.name, reason[:LOGGED_CHARS])
        self.session.end("refused", reason)

    async def close(self) -> Ending:
        """After the session ended: its recording complete, and its ending logged (once)."""
        recording = self.session.recording
        ending = await asyncio.to_thread(self.session.close)
        assert ending is not None, "close a call once its session has ended"
        if ending.reason != "refused" and not self._logged:
            self._logged = True
            seconds = recording.seconds if recording is not None else self.session.elapsed_s
            logger.info("%s: ended (%s) after %s; %s", self.name, ending.reason, clock_text(seconds), self.session.stats)
        return ending
