"""Session: one conversation's timeline, owned from the first microphone sample to the last frame.

Implements:
  * `Session`: the caller pushes the user's audio in chunks of any size (`push`) and takes the
    agent's audio out (`next`, `next_async`), from any threads. Every 80 ms frame of input the
    session accepts gives exactly one 80 ms frame of output, in order: the model's answer to
    it, or silence while the system prompt loads, for input it had to drop, and when the
    engine's answer is late. So the output never runs more than `Limits.max_delay_s` (plus one
    tick in flight) behind the input, whatever the client or the engine does:
      - input beyond real time (a client sending faster than it speaks, a burst after a stall)
        is dropped before it gets a frame: a token bucket of `burst_frames` frames, refilled
        at 12.5 frames a second;
      - input the engine has not taken `max_delay_s` after it arrived is withdrawn (silence);
      - output the consumer does not fetch is bounded (`max_pending` frames, oldest dropped).
    One idle timeout and an optional time limit end the session; the engine thread checks them
    too, so a vanished client cannot keep a slot. The text and the recording are built on the
    threads that push and take audio, never on the engine thread.
  * Framing aligned to the engine's tick: the session shifts where its frames begin, once,
    as `personaplex.framing` chooses (zeros in front, every sample kept).
  * `Limits` (`REALTIME`, `OFFLINE`), `Ending`, `Output`, `SessionStats`.

The engine thread sees a session only through `_take` (its input for a tick) and `_deliver`
(the tick's answer), which `EngineWorker` calls. A tick that finds no input steps the slot with
silence (the other slots cannot wait); its answer has no input frame to answer and is dropped.
A tick takes one frame; a backlog (a late frame, a burst after a network stall) would leave the
call late for good, so quiet backlog frames are skipped, and beyond `Limits.max_queued` frames
the oldest go unheard.
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from .audio import FrameBuffer
from .config import FRAME_RATE, FRAME_SIZE
from .framing import ALIGN_WATCH_S, Aligner
from .recording import CallRecording
from .transcript import FRAME_S, SPEECH_DB, level_db

if TYPE_CHECKING:
    from .worker import EngineWorker

SILENCE = np.zeros(FRAME_SIZE, dtype=np.float32)
GAP_TOLERANCE_S = 0.5  # input that pauses longer than this leaves silence in the recording
UNBOUND_BACKLOG = 125  # frames kept for the recording before a session has one (10 s)


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


@dataclass(frozen=True)
class Output:
    pcm: np.ndarray  # [1920] float32: the model's audio, or silence
    user: np.ndarray  # [1920] float32: what the user said in this frame
    text: str  # the model's words in this frame ('' for none)
    index: int  # frame number in the call: it starts index * 80 ms after the first input
    from_model: bool


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
class _Frame:
    index: int
    user: np.ndarray  # [1920] what the user said
    arrived: float
    state: _State = _State.DONE
    agent: np.ndarray | None = None  # [1920] the model's answer; None: silence
    text_id: int | None = None
    trimmed: bool = False  # skipped in a pause to catch up with a backlog


@dataclass
class _Waiters:
    """Who to wake when a frame is answered: threads (the condition) and asyncio loops."""

    loops: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=list)

    def wake(self) -> None:
        for loop, event in list(self.loops):
            if not loop.is_closed():
                loop.call_soon_threadsafe(event.set)


class Session:
    """A conversation's timeline. Thread-safe; see the module docstring."""

    def __init__(self, limits: Limits = REALTIME, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._cond = threading.Condition()
        self._record_lock = threading.Lock()
        self._framer = FrameBuffer()
        self._frames: deque[_Frame] = deque()  # accepted and not yet handed out, oldest first
        self._queue: deque[_Frame] = deque()  # of them, those waiting for the engine
        self._taken: _Frame | None = None
        self._to_record: list[_Frame] = []
        self._recording: CallRecording | None = None
        self._describe: Callable[[int], str] = lambda _: ""
        self._waiters = _Waiters()
        self._worker: EngineWorker | None = None
        self._aligner = Aligner(active=limits.realtime)
        self._last_answer: np.ndarray | None = None  # the model's latest audio (is it speaking?)
        self.slot: int | None = None
        self.prompt_frames = 0
        self.keeps_persona = False  # the prompt stays in the model's window past its context
        self.phase = Phase.WAITING
        self.ending: Ending | None = None
        self.stats = SessionStats()
        self.started = clock()
        self._last_input = self.started
        self._credit = float(limits.burst_frames)
        self._credited_at = self.started
        self._recorded_until = self.started  # arrival time covered by the recording

    # --- the caller's side ---------------------------------------------------------------
    def push(self, pcm: np.ndarray, final: bool = False) -> None:
        """The user's audio, float32 [T] at 24 kHz, any T. `final`: the input ends here (the
        last partial frame is padded with zeros)."""
        now = self._clock()
        with self._cond:
            if self.phase is Phase.ENDED:
                return
            self._last_input = now
            frames = self._framer.push(pcm)
            frames += self._align(now, pcm.size)
            if final and self._framer.pending:
                frames += self._framer.push(np.zeros(FRAME_SIZE - self._framer.pending, dtype=np.float32))
            for frame in frames:
                self._accept(frame, now)
            self._drop_unfetched()
            if frames:
                self._cond.notify_all()  # a consumer waits for a frame that now has a deadline
            wake_engine = bool(self._queue) and self._worker is not None
        self._flush_recording()
        self._waiters.wake()
        if wake_engine:
            assert self._worker is not None
            self._worker.wake()

    def next(self, timeout: float) -> Output | None:
        """The next output frame, waiting up to `timeout` s; None if none is due yet or the
        session has ended (see `ending`)."""
        self.check_limits()
        deadline = self._clock() + timeout
        with self._cond:
            while True:
                now = self._clock()
                frame = self._pop_answered(now)
                if frame is not None or self.phase is Phase.ENDED or now >= deadline:
                    break
                self._cond.wait(min(deadline, self._next_due(now)) - now)
        return self._output(frame)

    async def next_async(self, timeout: float) -> Output | None:
        """`next` for an asyncio consumer: waits without holding a thread."""
        self.check_limits()
        loop = asyncio.get_running_loop()
        deadline = self._clock() + timeout
        event = asyncio.Event()
        entry = (loop, event)
        while True:
            with self._cond:
                now = self._clock()
                frame = self._pop_answered(now)
                if frame is not None or self.phase is Phase.ENDED or now >= deadline:
                    break
                wait = min(deadline, self._next_due(now)) - now
                event.clear()
                self._waiters.loops.append(entry)
            try:
                await asyncio.wait_for(event.wait(), max(wait, 0.0))
            except TimeoutError:
                pass
            finally:
                with self._cond:
                    self._waiters.loops.remove(entry)
        return self._output(frame)

    def end(self, reason: str, message: str) -> None:
        """Stop the conversation (any thread, any number of times: the first reason stays) and
        free its slot. What was not handed out yet goes to the recording only."""
        with self._cond:
            if self.phase is Phase.ENDED:
                return
            self.phase = Phase.ENDED
            self.ending = Ending(reason, message)
            while self._frames:
                self._to_record.append(self._frames.popleft())
            self._queue.clear()
            self._cond.notify_all()
        self._waiters.wake()
        if self._worker is not None:
            self._worker._release(self)

    def close(self) -> Ending | None:
        """After `end`: finish the recording (its files are complete when this returns).
        Not for the engine thread (it writes files)."""
        self._flush_recording()
        if self._recording is not None and self.phase is Phase.ENDED:
            with self._record_lock:
                self._recording.close()
        return self.ending

    def record_to(self, recording: CallRecording) -> None:
        """Write the call into `recording`, from its first frame (kept until now)."""
        with self._cond:
            self._recording = recording
        self._flush_recording()

    @property
    def recording(self) -> CallRecording | None:
        return self._recording

    @property
    def elapsed_s(self) -> float:
        """Wall-clock time since the session was created."""
        return self._clock() - self.started

    @property
    def backlog(self) -> int:
        with self._cond:
            return len(self._queue)

    def check_limits(self) -> None:
        """End the session if its client went quiet or its time is up."""
        now = self._clock()
        limits = self.limits
        if now - self._last_input > limits.idle_timeout_s and self.phase is not Phase.WAITING:
            self.end("idle", f"no audio from your browser for {limits.idle_timeout_s:g} s: the call was closed")
        elif limits.time_limit_s is not None and now - self.started > limits.time_limit_s:
            self.end("time limit", f"the call reached its time limit of {_minutes(limits.time_limit_s)}")

    # --- the engine thread's side (EngineWorker) ------------------------------------------
    def _bind(self, worker: EngineWorker, slot: int, prompt_frames: int, describe: Callable[[int], str],
              keeps_persona: bool = False) -> None:
        with self._cond:
            self._worker, self.slot, self.prompt_frames, self._describe = worker, slot, prompt_frames, describe
            self.keeps_persona = keeps_persona
            if self.phase is Phase.WAITING:
                self.phase = Phase.STARTING

    def _go_live(self) -> float | None:
        """The prompt has run. Shifts the framing if enough chunks came meanwhile and returns
        how long its frames will then wait for a tick (None: not shifted yet)."""
        wait = None
        with self._cond:
            if self.phase is Phase.STARTING:
                if self._aligner.ready:  # shift now: nothing is queued for the engine yet
                    frames, wait = self._shift_framing()
                    for frame in frames:
                        self._accept(frame, self._clock())
                self.phase = Phase.LIVE
                self._last_input = self._clock()
        return wait

    def _input_state(self, now: float) -> float | None:
        """Arrival time of the oldest frame waiting for the engine (None: nothing waits)."""
        with self._cond:
            self._withdraw_late(now)
            return self._queue[0].arrived if self._queue else None

    def _take(self, now: float) -> np.ndarray | None:
        """This tick's input: the oldest waiting frame, or None (the slot hears silence)."""
        with self._cond:
            self._withdraw_late(now)
            if not self._queue or self.phase is not Phase.LIVE:
                return None
            if self.limits.realtime:
                self._trim_backlog(now)
            frame = self._queue.popleft()
            frame.state = _State.TAKEN
            self._taken = frame
            return frame.user

    def _deliver(self, pcm: np.ndarray, text_id: int) -> None:
        """The tick's answer to what `_take` gave (copies nothing the caller reuses)."""
        with self._cond:
            frame, self._taken = self._taken, None
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
        frame = _Frame(self.stats.frames_in, pcm, now)
        self.stats.frames_in += 1
        if self.phase is Phase.LIVE or (not self.limits.realtime and self.phase is Phase.STARTING):
            frame.state = _State.QUEUED
            self._queue.append(frame)
        else:
            self.stats.unheard += 1  # the system prompt is loading
        self._frames.append(frame)

    def _align(self, now: float, samples: int) -> list[np.ndarray]:
        """Watch the client's chunks arrive. The framing is shifted when the session goes live
        (`_go_live`), or, if the client had not sent enough by then, once it has been watched
        live for `ALIGN_WATCH_S`. Returns the frames a shift completed."""
        self._aligner.observe(now, samples)
        if self.phase is not Phase.LIVE or not self._aligner.ready or self._aligner.watched_s(now) < ALIGN_WATCH_S:
            return []
        return self._shift_framing()[0]

    def _shift_framing(self) -> tuple[list[np.ndarray], float]:
        """Put the zeros the aligner chooses in front of the next samples: the frames they
        complete, and the wait for a tick the frames will have."""
        assert self._worker is not None
        shift, wait = self._aligner.choose(self._worker.grid)
        return self._framer.push(np.zeros(shift, dtype=np.float32)), wait

    @property
    def framing_shift(self) -> int | None:
        """Zeros put in front of the frames to align them to the ticks (None: not yet)."""
        return self._aligner.shift

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
        taken = self._taken
        if taken is not None and taken.state is _State.TAKEN and now - taken.arrived > self.limits.max_delay_s + self.limits.stall_s:
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
            self._to_record.append(frame)

    def _pop_answered(self, now: float) -> _Frame | None:
        self._withdraw_late(now)
        if not self._frames or self._frames[0].state is not _State.DONE:
            return None
        frame = self._frames.popleft()
        self._to_record.append(frame)
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

    # --- outside the lock ----------------------------------------------------------------
    def _output(self, frame: _Frame | None) -> Output | None:
        self._flush_recording()
        if frame is None:
            return None
        text = self._describe(frame.text_id) if frame.text_id is not None else ""
        pcm = frame.agent if frame.agent is not None else SILENCE
        return Output(pcm=pcm, user=frame.user, text=text, index=frame.index, from_model=frame.agent is not None)

    def _flush_recording(self) -> None:
        """Write handed-out frames to the recording, in order, on the calling thread."""
        with self._record_lock:
            with self._cond:
                recording = self._recording
                if recording is None:
                    del self._to_record[:-UNBOUND_BACKLOG]
                    return
                batch, self._to_record = self._to_record, []
            for frame in batch:
                self._record(recording, frame)

    def _record(self, recording: CallRecording, frame: _Frame) -> None:
        gap = frame.arrived - self._recorded_until
        if gap > GAP_TOLERANCE_S and recording.frames:
            recording.add_silence(round(gap / FRAME_S) - 1)
        self._recorded_until = max(self._recorded_until, frame.arrived) + FRAME_S
        text = self._describe(frame.text_id) if frame.text_id is not None else ""
        recording.add(frame.user, frame.agent, text)


def _minutes(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 60}:{whole % 60:02d}" if whole >= 60 else f"{whole} s"
