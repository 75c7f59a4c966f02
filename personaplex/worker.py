"""EngineWorker: one thread owns the device and steps every live conversation together.

Implements:
  * `EngineWorker`: the thread. Between ticks it runs queued jobs (a session's system prompt,
    a custom voice's encoding); each tick it takes one input frame from every live session
    and runs one batched `Engine.step` over the smallest slot range that holds them all;
  * `Session`: one conversation's handle, used from any thread. `push` queues 80 ms of the
    user's audio, outputs go to the `on_frame` callback, `close` frees the slot. The queue
    absorbs bursts of up to `max_backlog` frames (the engine catches up at once when it is
    faster than real time); beyond that the oldest frames are dropped and counted, and a
    backlog that stands for 2 s is shed a frame at a time, so latency never grows;
  * `Busy`: every slot is taken.

A tick starts once every live real-time session has a frame queued, or when the oldest queued
frame has waited `max_wait_s` (a late client then gets 80 ms of silence instead of holding the
others back). Sessions fed from a file (`realtime=False`) never hold a tick back. A real-time
session that sends nothing for `idle_timeout_s` is closed and its slot freed.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .config import FRAME_SIZE
from .engine import Engine
from .generate import PromptFrames
from .sampling import SamplingParams

logger = logging.getLogger(__name__)


class Busy(RuntimeError):
    """No free conversation slot."""


@dataclass
class FrameOut:
    pcm: np.ndarray  # [1920] float32 agent audio
    user_pcm: np.ndarray  # [1920] float32 the user's audio the engine heard at this tick
    text_id: int
    tick_ms: float  # compute time of the tick that made this frame (all sessions together)
    index: int  # 0-based frame number in the conversation


@dataclass
class SessionStats:
    frames_in: int = 0
    frames_out: int = 0
    dropped: int = 0  # input frames dropped because the engine fell behind
    late: int = 0  # ticks without input from this session (silence used)


class Session:
    """A conversation in one slot. `push` and `close` may be called from any thread."""

    def __init__(
        self,
        worker: EngineWorker,
        slot: int,
        on_frame: Callable[[FrameOut], None],
        realtime: bool,
        max_backlog: int,
    ) -> None:
        self.id = next(_ids)
        self.slot = slot
        self.prompt_frames = 0  # length of its system prompt (80 ms frames)
        self.realtime = realtime
        self.on_frame = on_frame
        self.stats = SessionStats()
        self.ready = threading.Event()  # the system prompt has run
        self.closed = threading.Event()
        self.error: BaseException | None = None
        self._worker = worker
        self._inputs: collections.deque[np.ndarray] = collections.deque()
        self._max_backlog = max_backlog
        self._window, self._standing = 0, 1 << 30  # ticks in the window, smallest backlog seen
        self._last_input = time.monotonic()
        self._oldest_input: float | None = None

    def push(self, frame: np.ndarray) -> None:
        """Queue one 80 ms frame ([1920] float32) of the user's audio."""
        assert frame.shape == (FRAME_SIZE,), f"expected [{FRAME_SIZE}] samples, got {frame.shape}"
        with self._worker._cond:
            if self.closed.is_set():
                return
            self.stats.frames_in += 1
            self._last_input = time.monotonic()
            if self._oldest_input is None:
                self._oldest_input = self._last_input
            self._inputs.append(frame)
            while self.realtime and len(self._inputs) > self._max_backlog:
                self._inputs.popleft()
                self.stats.dropped += 1
            self._worker._cond.notify()

    def close(self) -> None:
        self._worker._close(self)

    @property
    def backlog(self) -> int:
        return len(self._inputs)

    def _take(self) -> np.ndarray | None:
        """The next input frame for a tick. A backlog that stands for a whole window (the
        client keeps a steady lead, e.g. after a burst) is shed one frame per window."""
        if self.realtime:
            self._standing = min(self._standing, len(self._inputs))
            self._window += 1
            if self._window >= STANDING_WINDOW:
                if self._standing >= 2:
                    self._inputs.popleft()
                    self.stats.dropped += 1
                self._window, self._standing = 0, 1 << 30
        frame = self._inputs.popleft() if self._inputs else None
        self._oldest_input = time.monotonic() if self._inputs else None
        return frame


_ids = itertools.count(1)
STANDING_WINDOW = 25  # ticks (2 s)


class EngineWorker:
    def __init__(
        self,
        engine: Engine,
        max_wait_s: float = 0.1,
        idle_timeout_s: float = 4.0,
        max_backlog: int = 6,
    ) -> None:
        self.engine = engine
        self.max_wait_s = max_wait_s
        self.idle_timeout_s = idle_timeout_s
        self.max_backlog = max_backlog
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

    def open_session(
        self,
        prompt: PromptFrames,
        sampling: SamplingParams,
        on_frame: Callable[[FrameOut], None],
        inputs: list[np.ndarray] | None = None,
    ) -> Session:
        """Reserve a slot and queue the session's system prompt. Raises `Busy` when every slot
        is taken; a failing prompt closes the session with `error` set.

        Without `inputs` the session is real time: the caller pushes frames as they come. With
        `inputs` (a whole recording, [1920] float32 frames) the session runs from them at the
        engine's pace and closes itself after the last one.
        """
        plan = self.engine.plan(prompt)  # host work, here rather than between two ticks
        with self._cond:
            free = [s for s in range(self.engine.num_slots) if s not in self._sessions]
            if not free:
                raise Busy(f"all {self.engine.num_slots} conversation slots are in use: try again in a minute")
            session = Session(self, free[0], on_frame, inputs is None, self.max_backlog)
            session.prompt_frames = plan.offset
            self._sessions[session.slot] = session

        def start() -> None:
            if session.closed.is_set():  # closed before its turn: its slot may be someone else's now
                return
            try:
                self.engine.start(session.slot, plan, sampling)
            except BaseException as exc:
                logger.exception("session %d: its system prompt failed", session.id)
                session.error = exc
                self._close(session)
                raise
            with self._cond:
                session._inputs.clear()  # what arrived during the prompt is stale
                session._inputs.extend(inputs or [])
                session.stats.frames_in = len(inputs or [])
                session._oldest_input = time.monotonic() if inputs else None
                session._last_input = time.monotonic()
            session.ready.set()

        self.call(start)
        return session

    @property
    def live_sessions(self) -> int:
        with self._cond:
            return len(self._sessions)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=10)

    def _close(self, session: Session) -> None:
        with self._cond:
            session.closed.set()
            if self._sessions.get(session.slot) is session:
                del self._sessions[session.slot]
            session._inputs.clear()
            session.ready.set()  # wake anyone waiting for a prompt that will not come
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

    def _next_work(self) -> tuple[tuple[Callable[[], Any], Future] | None, list[tuple[Session, np.ndarray | None]] | None]:
        """Block until there is a job or a tick to run; (None, None) when stopping."""
        with self._cond:
            while True:
                if self._stopping:
                    return None, None
                if self._jobs:
                    return self._jobs.popleft(), None
                self._expire_idle()
                live = [s for s in self._sessions.values() if s.ready.is_set() and not s.closed.is_set()]
                waiting = [s for s in live if s.realtime and not s._inputs]
                pending = [s._oldest_input for s in live if s._oldest_input is not None]
                if live and pending:
                    overdue = time.monotonic() - min(pending) >= self.max_wait_s
                    if not waiting or overdue:
                        return None, [(s, s._take()) for s in live]
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

    def _expire_idle(self) -> None:
        now = time.monotonic()
        for session in list(self._sessions.values()):
            if session.realtime and session.ready.is_set() and now - session._last_input > self.idle_timeout_s:
                logger.info("session %d sent no audio for %.0f s: freeing slot %d", session.id, self.idle_timeout_s, session.slot)
                self._close(session)

    def _tick(self, live: list[tuple[Session, np.ndarray | None]]) -> None:
        bucket = self.engine.bucket_for(max(s.slot for s, _ in live) + 1)
        batch = np.zeros((bucket, FRAME_SIZE), dtype=np.float32)
        for session, frame in live:
            if frame is None:
                session.stats.late += 1
            else:
                batch[session.slot] = frame
        start = time.perf_counter()
        out = self.engine.step(torch.from_numpy(batch), bucket)
        self._wait_for_device()
        pcm = out.pcm.float().cpu().numpy()  # the tick's results to the host (the device is done)
        text = out.text.cpu().numpy()
        self.last_tick_ms = (time.perf_counter() - start) * 1000
        for session, _ in live:
            if session.closed.is_set():  # closed by its owner during the tick
                continue
            index = session.stats.frames_out
            session.stats.frames_out += 1
            try:
                session.on_frame(
                    FrameOut(pcm[session.slot].copy(), batch[session.slot], int(text[session.slot]), self.last_tick_ms, index)
                )
            except Exception:  # a broken consumer must not stop the other conversations
                logger.exception("session %d: output callback failed; closing it", session.id)
                self._close(session)
            if not session.realtime and not session._inputs:
                self._close(session)  # its recording is done
