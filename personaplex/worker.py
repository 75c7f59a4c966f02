"""EngineWorker: one thread owns the device and steps every live conversation together.

Implements:
  * `EngineWorker`: the engine thread. Between ticks it runs queued jobs (a session's system
    prompt, a custom voice's encoding); each tick it takes one input frame from every live
    session and runs one batched `Engine.step` over the smallest slot range that holds them,
    then hands each session its answer. It runs no app code: a session's consumers build text
    and recordings on their own threads (`personaplex.session`);
  * `Busy`: every slot is taken.

A tick starts once every live real-time session has a frame, or when the oldest waiting frame
has waited `max_wait_s` (a late client then hears silence for one tick instead of holding the
others back). Sessions fed from a recording never hold a tick back. The worker also ends
sessions whose client went quiet or whose time is up (`Session.check_limits`), so a vanished
consumer cannot keep a slot.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch

from .config import FRAME_SIZE
from .engine import Engine
from .errors import UserError
from .generate import PromptFrames
from .sampling import SamplingParams
from .session import Phase, Session

logger = logging.getLogger(__name__)


class Busy(UserError):
    """No free conversation slot."""


class EngineWorker:
    def __init__(self, engine: Engine, max_wait_s: float = 0.1) -> None:
        self.engine = engine
        self.max_wait_s = max_wait_s
        self.last_tick_ms = 0.0
        self._cond = threading.Condition()
        self._jobs: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._sessions: dict[int, Session] = {}  # slot -> session
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="personaplex-engine", daemon=True)
        self._thread.start()

    # --- used from other threads ---------------------------------------------------------
    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine thread between two ticks; its result comes through the future."""
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is stopped")
            self._jobs.append((fn, future))
            self._cond.notify()
        return future

    def open(self, session: Session, prompt: PromptFrames, sampling: SamplingParams, describe: Callable[[int], str]) -> None:
        """Give `session` a slot and queue its system prompt; it goes live once the prompt has
        run. Raises `Busy` when every slot is taken; a prompt failing on the engine thread ends
        the session with reason "error". `describe` turns a text id into words (on the
        session's threads)."""
        plan = self.engine.plan(prompt)  # host work, here rather than between two ticks
        with self._cond:
            if session.phase is Phase.ENDED:
                return
            free = [s for s in range(self.engine.num_slots) if s not in self._sessions]
            if not free:
                raise Busy(f"all {self.engine.num_slots} conversation slots are in use: try again in a minute")
            session._bind(self, free[0], plan.offset, describe)
            self._sessions[free[0]] = session

        def start() -> None:
            if session.phase is Phase.ENDED:  # ended before its turn: its slot may be someone else's now
                return
            try:
                self.engine.start(session.slot, plan, sampling)  # type: ignore[arg-type]
            except Exception as exc:
                logger.exception("session in slot %s: its system prompt failed", session.slot)
                session.end("error", f"the call could not start: {exc}")
                raise
            session._go_live()

        self.call(start)

    def wake(self) -> None:
        """A session has input: look at the schedule again."""
        with self._cond:
            self._cond.notify()

    @property
    def live_sessions(self) -> int:
        with self._cond:
            return len(self._sessions)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            sessions = list(self._sessions.values())
            self._cond.notify()
        for session in sessions:
            session.end("shutdown", "the server is shutting down")
        self._thread.join(timeout=10)

    def _release(self, session: Session) -> None:
        """Free the slot of an ended session (called by `Session.end`)."""
        with self._cond:
            if session.slot is not None and self._sessions.get(session.slot) is session:
                del self._sessions[session.slot]
            self._cond.notify()

    # --- the engine thread -------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                job, live = self._next_work()
                if job is None and live is None:
                    return
                if job is not None:
                    fn, future = job
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn())
                        except BaseException as exc:  # reported through the future
                            future.set_exception(exc)
                    continue
                assert live is not None
                self._tick(live)

    def _next_work(self) -> tuple[tuple[Callable[[], Any], Future] | None, list[Session] | None]:
        """Block until there is a job or a tick to run; (None, None) when stopping."""
        with self._cond:
            while True:
                if self._stopping:
                    return None, None
                if self._jobs:
                    return self._jobs.popleft(), None
                for session in list(self._sessions.values()):
                    session.check_limits()
                now = time.monotonic()
                live = [s for s in self._sessions.values() if s.phase is Phase.LIVE]
                oldest = {s: s._input_state(now) for s in live}
                pending = [t for t in oldest.values() if t is not None]
                if pending:
                    waiting = any(s.limits.realtime and oldest[s] is None for s in live)
                    if not waiting or now - min(pending) >= self.max_wait_s:
                        return None, live
                timeout = self.max_wait_s if pending else 0.5
                self._cond.wait(timeout=timeout / 2)

    def _wait_for_device(self) -> None:
        """Let the GPU finish the tick while this thread sleeps, so that the event loop serving
        every connection (WebRTC, Opus) keeps the interpreter meanwhile."""
        if self.engine.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
            while not done.query():
                time.sleep(0.0002)

    def _tick(self, live: list[Session]) -> None:
        bucket = self.engine.bucket_for(max(s.slot for s in live) + 1)  # type: ignore[type-var]
        batch = np.zeros((bucket, FRAME_SIZE), dtype=np.float32)
        now = time.monotonic()
        for session in live:
            frame = session._take(now)
            if frame is not None:
                batch[session.slot] = frame
        start = time.perf_counter()
        out = self.engine.step(torch.from_numpy(batch), bucket)
        self._wait_for_device()
        pcm = out.pcm.float().cpu().numpy()  # the tick's results to the host (the device is done)
        text = out.text.cpu().numpy()
        self.last_tick_ms = (time.perf_counter() - start) * 1000
        for session in live:
            session._deliver(pcm[session.slot].copy(), int(text[session.slot]))
