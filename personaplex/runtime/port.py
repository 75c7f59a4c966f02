"""Port: the one place where a conversation and the engine thread meet.

Implements:
  * `Port`: one conversation's 80 ms frames between the two threads that touch them, under one
    lock. The caller's side (`runtime.session.Session`) puts the user's frames in (`accept`)
    and takes them back answered, in order (`next_frame`, `next_frame_async`); the engine's side
    (`runtime.worker.EngineWorker`, which holds the port while it has a slot) binds it to a
    slot (`bind`), opens it once the system prompt has run (`go_live`), takes one frame a tick
    (`take`) and answers it (`answer`). Neither side knows the other: the session never calls the
    worker and the worker never sees the session. The port rings the doorbell the worker gave it
    (`bind`) when input waits, when the caller chose its framing, and when the call ends.
  * The rules that keep a call in real time, which both sides meet: input beyond real time is
    dropped before it gets a frame (a token bucket); a frame not taken `max_delay_s` after it came
    is answered with silence; a backlog is trimmed in pauses; unfetched output is bounded; the
    idle timeout and the time limit (`expire`, which the engine thread checks too, so a vanished
    client cannot keep a slot).
  * `Limits` (`REALTIME`, `OFFLINE`), `Phase`, `Ending`, `SessionStats`, `CallFrame`.

A tick that finds no input steps the slot with silence (the other slots cannot wait); its answer
has no input frame to answer and is dropped. A tick takes one frame; a backlog (a late frame, a
burst after a network stall) would leave the call late for good, so quiet backlog frames are
skipped, and beyond `Limits.max_queued` frames the oldest go unheard.

(Some 400 lines: one class under one lock; the real-time rules change the same queues and are
kept together so that none is read apart from the others.)
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..model.config import FRAME_RATE, FRAME_S
from .audio import SPEECH_DB, level_db
from .framing import TickGrid


@dataclass(frozen=True)
class Limits:
    realtime: bool = True  # False: a recording fed at the engine's pace (no bucket, no deadlines)
    max_delay_s: float = 0.32  # an input frame not taken by the engine this long after it came is answered with silence
    stall_s: float = 2.0  # an answer the engine started is waited for this much longer
    burst_frames: int = 4  # input accepted ahead of real time
    max_pending: int = 8  # answered frames kept for a consumer that does not fetch them
    max_queued: int = 4  # input frames waiting for the engine; beyond, the oldest go unheard
    idle_timeout_s: float = 3.0  # no input this long: the client is gone
    time_limit_s: float | None = None


REALTIME = Limits()
OFFLINE = Limits(realtime=False, idle_timeout_s=float("inf"))


class Phase(enum.Enum):
    WAITING = "waiting"  # no slot yet: input is answered with silence
    STARTING = "starting"  # a slot, the system prompt queued or running: silence
    LIVE = "live"
    ENDED = "ended"


@dataclass(frozen=True)
class Ending:
    reason: str  # stopped, time limit, idle, refused, error, shutdown
    message: str  # for the person on the call


@dataclass
class SessionStats:
    frames_in: int = 0  # 80 ms frames accepted
    too_fast: int = 0  # frames dropped because the client sent faster than real time
    unheard: int = 0  # accepted frames the model did not hear (loading, engine too slow)
    frames_out: int = 0  # frames handed to the consumer
    silent_out: int = 0  # of them, silence because the model had no answer in time
    dropped_out: int = 0  # answered frames the consumer did not take in time
    idle_ticks: int = 0  # ticks that found no input from this session (the model heard silence)
    trimmed: int = 0  # quiet frames skipped to catch up with a backlog (not counted as unheard)

    def copy(self) -> SessionStats:
        return replace(self)


class _State(enum.Enum):
    QUEUED = 1  # waiting for the engine
    TAKEN = 2  # in the engine's current tick
    DONE = 3  # answered (by the model, or with silence)


@dataclass(eq=False)
class CallFrame:
    """One 80 ms frame of the call: what the user said and, once answered, the model's answer."""

    index: int
    user: np.ndarray  # [1920] what the user said
    arrived: float
    state: _State = _State.DONE
    agent: np.ndarray | None = None  # [1920] the model's answer; None: silence
    text_id: int | None = None
    trimmed: bool = False  # skipped in a pause to catch up with a backlog


@dataclass
class _Waiters:
    """asyncio loops waiting for a frame (threads wait on the port's condition)."""

    loops: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=list)

    def wake(self) -> None:
        for loop, event in list(self.loops):
            if not loop.is_closed():
                loop.call_soon_threadsafe(event.set)


class Port:
    """One conversation's frames between its caller and the engine thread. Thread-safe."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._cond = threading.Condition()
        self._frames: deque[CallFrame] = deque()  # accepted and not yet handed out, oldest first
        self._queue: deque[CallFrame] = deque()  # of them, those waiting for the engine
        self._taken: deque[CallFrame] = deque()  # taken and not answered yet, oldest first (the worker: at most one)
        self._spent: list[CallFrame] = []  # handed out or dropped: for the caller's recording
        self._last_answer: np.ndarray | None = None  # the model's latest audio (is it speaking?)
        self._waiters = _Waiters()
        self._doorbell: Callable[[], None] = lambda: None
        self._framing_wait: float | None = None  # reported by the caller, for the engine's grid
        self.slot: int | None = None
        self.prompt_frames = 0
        self.keeps_persona = False  # the prompt stays in the model's window past its context
        self.grid: TickGrid | None = None  # the engine's ticks, once the call is live
        self.phase = Phase.WAITING
        self.ending: Ending | None = None
        self.stats = SessionStats()
        self.started = clock()
        self._last_input = self.started
        self._credit = float(limits.burst_frames)
        self._credited_at = self.started

    @property
    def realtime(self) -> bool:
        return self.limits.realtime

    @property
    def ended(self) -> bool:
        return self.phase is Phase.ENDED

    # --- the caller's side -------------------------------------------------------------------
    def accept(self, frames: list[np.ndarray], now: float) -> None:
        """Input came (even with no whole frame: the client is there); `frames` are whole 80 ms
        frames, in order."""
        with self._cond:
            if self.phase is Phase.ENDED:
                return
            self._last_input = now
            for pcm in frames:
                self._accept(pcm, now)
            self._drop_unfetched()
            if frames:
                self._cond.notify_all()  # a consumer waits for a frame that now has a deadline
            ring = bool(self._queue) and self.slot is not None
        self._waiters.wake()
        if ring:
            self._doorbell()

    def next_frame(self, timeout: float) -> CallFrame | None:
        """The next frame answered (by the model, or with silence), waiting up to `timeout` s;
        None if none is due yet or the call has ended."""
        self.expire()
        deadline = self._clock() + timeout
        with self._cond:
            while True:
                now = self._clock()
                frame = self._pop_answered(now)
                if frame is not None or self.phase is Phase.ENDED or now >= deadline:
                    return frame
                self._cond.wait(min(deadline, self._next_due(now)) - now)

    async def next_frame_async(self, timeout: float) -> CallFrame | None:
        """`next_frame` for an asyncio consumer: waits without holding a thread."""
        self.expire()
        deadline = self._clock() + timeout

        def answered(now: float) -> tuple[bool, CallFrame | None, float]:
            frame = self._pop_answered(now)
            if frame is not None or self.phase is Phase.ENDED or now >= deadline:
                return True, frame, 0.0
            return False, None, min(deadline, self._next_due(now)) - now

        return await self._wait_async(answered)

    async def until_live(self, timeout: float) -> bool:
        """Wait (asyncio) until the system prompt has run; False if the call ended or it took longer."""
        deadline = self._clock() + timeout

        def started(now: float) -> tuple[bool, bool, float]:
            return self.phase in (Phase.LIVE, Phase.ENDED) or now >= deadline, self.phase is Phase.LIVE, deadline - now

        return await self._wait_async(started)

    async def _wait_async(self, poll: Callable[[float], tuple[bool, Any, float]]) -> Any:
        """`poll(now)` under the lock says (done, value, how long to wait at most); until it is
        done, wait without a thread for the port to change (`_Waiters`) or for that time."""
        event = asyncio.Event()
        entry = (asyncio.get_running_loop(), event)
        while True:
            with self._cond:
                done, value, wait = poll(self._clock())
                if done:
                    return value
                event.clear()
                self._waiters.loops.append(entry)
            try:
                await asyncio.wait_for(event.wait(), max(wait, 0.0))
            except TimeoutError:
                pass
            finally:
                with self._cond:
                    self._waiters.loops.remove(entry)

    def spent(self) -> list[CallFrame]:
        """The frames handed out or dropped since the last call, in order (for a recording)."""
        with self._cond:
            spent, self._spent = self._spent, []
        return spent

    def framing_chosen(self, wait: float) -> None:
        """The caller aligned its frames to the grid as the call went live: they will wait `wait`
        for a tick (the engine may move a lone call's ticks closer)."""
        with self._cond:
            self._framing_wait = wait
        self._doorbell()

    def end(self, reason: str, message: str) -> None:
        """Stop the conversation (any thread, any number of times: the first reason stays); the
        engine frees its slot. What was not handed out yet is spent (the recording keeps it)."""
        with self._cond:
            if self.phase is Phase.ENDED:
                return
            self.phase = Phase.ENDED
            self.ending = Ending(reason, message)
            self._spent.extend(self._frames)
            self._frames.clear()
            self._queue.clear()
            self._taken.clear()
            self._cond.notify_all()
        self._waiters.wake()
        self._doorbell()

    def expire(self) -> None:
        """End the call if its client went quiet or its time is up (either side may check)."""
        now = self._clock()
        limits = self.limits
        if now - self._last_input > limits.idle_timeout_s and self.phase is not Phase.WAITING:
            self.end("idle", f"no audio from your microphone for {limits.idle_timeout_s:g} s: the call was closed")
        elif limits.time_limit_s is not None and now - self.started > limits.time_limit_s:
            self.end("time limit", f"the call reached its time limit of {_minutes(limits.time_limit_s)}")

    # --- the engine's side (EngineWorker) --------------------------------------------------------
    def bind(self, slot: int, prompt_frames: int, keeps_persona: bool, doorbell: Callable[[], None]) -> None:
        """A slot is the call's; its system prompt is queued. `doorbell`: how the port tells the
        engine thread that something changed."""
        with self._cond:
            self.slot, self.prompt_frames, self.keeps_persona = slot, prompt_frames, keeps_persona
            self._doorbell = doorbell
            if self.phase is Phase.WAITING:
                self.phase = Phase.STARTING

    def move(self, slot: int) -> None:
        """The engine moved the call's state to another slot."""
        with self._cond:
            self.slot = slot

    def go_live(self, grid: TickGrid) -> None:
        """The system prompt has run: from now on the model hears the call (ticks on `grid`)."""
        with self._cond:
            if self.phase is not Phase.STARTING:
                return
            self.grid = grid
            self.phase = Phase.LIVE
            self._last_input = self._clock()
            self._cond.notify_all()
        self._waiters.wake()

    def framing_wait(self) -> float | None:
        """What the caller reported with `framing_chosen`, once (None: nothing new)."""
        with self._cond:
            wait, self._framing_wait = self._framing_wait, None
        return wait

    def waiting_since(self, now: float) -> float | None:
        """Arrival time of the oldest frame waiting for the engine (None: nothing waits)."""
        with self._cond:
            self._withdraw_late(now)
            return self._queue[0].arrived if self._queue else None

    def take(self, now: float) -> np.ndarray | None:
        """This tick's input: the oldest waiting frame, or None (the slot hears silence)."""
        with self._cond:
            self._withdraw_late(now)
            if not self._queue or self.phase is not Phase.LIVE:
                return None
            if self.limits.realtime:
                self._trim_backlog(now)
            frame = self._queue.popleft()
            frame.state = _State.TAKEN
            self._taken.append(frame)
            return frame.user

    def answer(self, pcm: np.ndarray, text_id: int) -> None:
        """The answer to the oldest frame `take` gave and not answered yet (an engine answers each
        tick's before the next; a remote engine has several on the way). Copies nothing the
        caller reuses."""
        with self._cond:
            frame = self._taken.popleft() if self._taken else None
            if frame is None:
                self.stats.idle_ticks += 1  # a tick without input: nothing to answer
            elif frame.state is _State.TAKEN:
                frame.agent, frame.text_id, frame.state = pcm, text_id, _State.DONE
                self._last_answer = pcm
                self._cond.notify_all()
            # else: given up on (a stalled engine) or dropped meanwhile, and counted there
        self._waiters.wake()

    # --- inside the lock ---------------------------------------------------------------------
    def _accept(self, pcm: np.ndarray, now: float) -> None:
        if self.limits.realtime:
            self._credit = min(self.limits.burst_frames, self._credit + (now - self._credited_at) * FRAME_RATE)
            self._credited_at = now
            if self._credit < 1:
                self.stats.too_fast += 1
                return
            self._credit -= 1
        frame = CallFrame(self.stats.frames_in, pcm, now)
        self.stats.frames_in += 1
        if self.phase is Phase.LIVE or (not self.limits.realtime and self.phase is Phase.STARTING):
            frame.state = _State.QUEUED
            self._queue.append(frame)
        else:
            self.stats.unheard += 1  # the system prompt is loading
        self._frames.append(frame)

    def _trim_backlog(self, now: float) -> None:
        """A tick takes one frame, so a frame more than the tick's (after a late frame or a
        burst) would stay for good: a backlog frame that has waited a whole tick is skipped
        when neither side is speaking (nobody misses anything: the model hears 80 ms less of
        the pause and answers it with silence), and beyond `max_queued` frames the oldest go
        unheard whatever they hold."""
        while len(self._queue) > 1 and now - self._queue[0].arrived > FRAME_S:
            forced = len(self._queue) > self.limits.max_queued
            head = self._queue[0]
            model_speaks = self._last_answer is not None and level_db(self._last_answer) > SPEECH_DB
            if not forced and (level_db(head.user) > SPEECH_DB or model_speaks):
                return  # someone is speaking: wait for a pause
            self._queue.popleft().state = _State.DONE
            head.trimmed = not forced
            self.stats.unheard += forced
            self.stats.trimmed += not forced

    def _withdraw_late(self, now: float) -> None:
        """Frames the engine can no longer answer in time are answered with silence."""
        if not self.limits.realtime:
            return
        while self._queue and now - self._queue[0].arrived > self.limits.max_delay_s:
            self._queue.popleft().state = _State.DONE
            self.stats.unheard += 1
        for taken in self._taken:
            if taken.state is _State.TAKEN and now - taken.arrived > self.limits.max_delay_s + self.limits.stall_s:
                taken.state = _State.DONE  # the engine stalled: its answer will be dropped
                self.stats.dropped_out += 1
        if self._frames and self._frames[0].state is _State.DONE:
            self._cond.notify_all()

    def _drop_unfetched(self) -> None:
        """Keep at most `max_pending` frames for a consumer that does not fetch them."""
        if not self.limits.realtime:
            return
        while len(self._frames) > self.limits.max_pending:
            frame = self._frames.popleft()
            if frame.state is _State.QUEUED:
                self._queue.remove(frame)
            frame.state = _State.DONE
            self.stats.dropped_out += 1  # (an answer still in the engine is dropped when it comes)
            self._spent.append(frame)

    def _pop_answered(self, now: float) -> CallFrame | None:
        self._withdraw_late(now)
        if not self._frames or self._frames[0].state is not _State.DONE:
            return None
        frame = self._frames.popleft()
        self._spent.append(frame)
        self.stats.frames_out += 1
        self.stats.silent_out += frame.agent is None and not frame.trimmed
        return frame

    def _next_due(self, now: float) -> float:
        """When the oldest unanswered frame is answered with silence at the latest."""
        if not self._frames:
            return np.inf
        head = self._frames[0]
        limit = self.limits.max_delay_s + (self.limits.stall_s if head.state is _State.TAKEN else 0.0)
        return head.arrived + limit if self.limits.realtime else np.inf


def _minutes(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 60}:{whole % 60:02d}" if whole >= 60 else f"{whole} s"
