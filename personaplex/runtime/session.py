"""Session: one conversation's timeline as its caller sees it, from the first microphone sample
to the last frame.

Implements:
  * `Session`: the caller pushes the user's audio in chunks of any size (`push`) and takes the
    agent's audio out (`next`, `next_async`), from any threads. Every 80 ms frame of input the
    session accepts gives exactly one 80 ms frame of output, in order: the model's answer to
    it, or silence while the system prompt loads, for input it had to drop, and when the
    engine's answer is late. So the output never runs more than `Limits.max_delay_s` (plus one
    tick in flight) behind the input, whatever the client or the engine does (the rules are the
    port's: `runtime.port`). One idle timeout and an optional time limit end the session.
    The text and the recording are built on the threads that push and take audio, never on
    the engine thread.
  * Framing aligned to the engine's tick: the session shifts where its frames begin, once,
    as `runtime.framing` chooses (zeros in front, every sample kept).
  * `Output`, and `Words`: how the call's text ids read, given by whoever starts the call (the
    model's tokenizer, or a cluster's pieces); `Limits` (`REALTIME`, `OFFLINE`), `Ending`,
    `Phase` and `SessionStats` come from the port.

The engine never sees the session: `Service` hands the session's `port` to the worker, and the
two meet only there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..model.config import FRAME_S, FRAME_SIZE
from .audio import FrameBuffer
from .framing import ALIGN_WATCH_S, Aligner
from .port import OFFLINE, REALTIME, CallFrame, Ending, Limits, Phase, Port, SessionStats
from .recording import CallRecording

__all__ = ["OFFLINE", "REALTIME", "Ending", "Limits", "Output", "Phase", "Session", "SessionStats", "Words"]

SILENCE = np.zeros(FRAME_SIZE, dtype=np.float32)
GAP_TOLERANCE_S = 0.5  # input that pauses longer than this leaves silence in the recording
UNBOUND_BACKLOG = 125  # frames kept for the recording before a session has one (10 s)


class Words(Protocol):
    """How the model's text ids read."""

    def caption(self, text_id: int) -> str:
        """What a person reads ('' for padding and the tokenizer's own markers)."""
        ...

    def piece(self, text_id: int) -> str:
        """As the official server sends it: the piece with "▁" as a space ('' for padding)."""
        ...


class _NoWords:
    """Before a call has started: no text ids to read."""

    def caption(self, text_id: int) -> str:
        return ""

    def piece(self, text_id: int) -> str:
        return ""


@dataclass(frozen=True)
class Output:
    pcm: np.ndarray  # [1920] float32: the model's audio, or silence
    user: np.ndarray  # [1920] float32: what the user said in this frame
    text: str  # the model's words in this frame ('' for none)
    index: int  # frame number in the call: it starts index * 80 ms after the first input
    from_model: bool
    text_id: int | None = None  # the model's text token for this frame (None: no answer)


class Session:
    """A conversation's timeline. Thread-safe; see the module docstring."""

    def __init__(self, limits: Limits = REALTIME, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.port = Port(limits, clock)  # the engine's side: given to the worker by `Service`
        self.words: Words = _NoWords()  # how its text ids read (set by the service that starts it)
        self._clock = clock
        self._push_lock = threading.Lock()  # the framing: one push at a time
        self._record_lock = threading.Lock()
        self._framer = FrameBuffer()
        self._aligner = Aligner(active=limits.realtime)
        self._saw_live = False  # the first push since the call went live has come
        self._to_record: list[CallFrame] = []
        self._recording: CallRecording | None = None
        self._recorded_until = self.port.started  # arrival time covered by the recording

    # --- the conversation --------------------------------------------------------------------
    def push(self, pcm: np.ndarray, final: bool = False) -> None:
        """The user's audio, float32 [T] at 24 kHz, any T. `final`: the input ends here (the
        last partial frame is padded with zeros)."""
        now = self._clock()
        with self._push_lock:
            frames = self._align_at_start()
            frames += self._framer.push(pcm)
            frames += self._align(now, pcm.size)
            if final and self._framer.pending:
                frames += self._framer.push(np.zeros(FRAME_SIZE - self._framer.pending, dtype=np.float32))
            self.port.accept(frames, now)
        self._flush_recording()

    def next(self, timeout: float) -> Output | None:
        """The next output frame, waiting up to `timeout` s; None if none is due yet or the
        session has ended (see `ending`)."""
        return self._output(self.port.next_frame(timeout))

    async def next_async(self, timeout: float) -> Output | None:
        """`next` for an asyncio consumer: waits without holding a thread."""
        return self._output(await self.port.next_frame_async(timeout))

    async def until_live(self, timeout: float) -> bool:
        """Wait until the persona's prompt has run (the model hears the call from then on);
        False if the call ended first or it took longer than `timeout` s."""
        return await self.port.until_live(timeout)

    def end(self, reason: str, message: str) -> None:
        """Stop the conversation (any thread, any number of times: the first reason stays) and
        free its slot. What was not handed out yet goes to the recording only."""
        self.port.end(reason, message)

    def check_limits(self) -> None:
        """End the session if its client went quiet or its time is up."""
        self.port.expire()

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
        self._recording = recording
        self._flush_recording()

    # --- its figures ---------------------------------------------------------------------------
    @property
    def phase(self) -> Phase:
        return self.port.phase

    @property
    def ending(self) -> Ending | None:
        return self.port.ending

    @property
    def stats(self) -> SessionStats:
        return self.port.stats

    @property
    def started(self) -> float:
        return self.port.started

    @property
    def slot(self) -> int | None:
        return self.port.slot

    @property
    def prompt_frames(self) -> int:
        return self.port.prompt_frames

    @property
    def keeps_persona(self) -> bool:
        return self.port.keeps_persona

    @property
    def recording(self) -> CallRecording | None:
        return self._recording

    @property
    def elapsed_s(self) -> float:
        """Wall-clock time since the session was created."""
        return self._clock() - self.port.started

    @property
    def framing_shift(self) -> int | None:
        """Zeros put in front of the frames to align them to the ticks (None: not yet)."""
        return self._aligner.shift

    # --- the framing (under the push lock) ---------------------------------------------------
    def _align_at_start(self) -> list[np.ndarray]:
        """The first push since the call went live: if enough chunks came meanwhile, shift the
        framing now (nothing is queued for the engine yet) and tell the engine how long the
        frames will then wait for a tick."""
        grid = self.port.grid
        if self._saw_live or self.port.phase is not Phase.LIVE or grid is None:
            return []
        self._saw_live = True
        if not self._aligner.ready:
            return []
        shift, wait = self._aligner.choose(grid)
        self.port.framing_chosen(wait)
        return self._framer.push(np.zeros(shift, dtype=np.float32))

    def _align(self, now: float, samples: int) -> list[np.ndarray]:
        """Watch the client's chunks arrive. The framing is shifted when the session goes live
        (`_align_at_start`), or, if the client had not sent enough by then, once it has been
        watched live for `ALIGN_WATCH_S`. Returns the frames a shift completed."""
        self._aligner.observe(now, samples)
        grid = self.port.grid
        if not self._saw_live or grid is None or not self._aligner.ready or self._aligner.watched_s(now) < ALIGN_WATCH_S:
            return []
        shift, _ = self._aligner.choose(grid)
        return self._framer.push(np.zeros(shift, dtype=np.float32))

    # --- output and the recording (the caller's threads) ---------------------------------------
    def _output(self, frame: CallFrame | None) -> Output | None:
        self._flush_recording()
        if frame is None:
            return None
        text = self.words.caption(frame.text_id) if frame.text_id is not None else ""
        pcm = frame.agent if frame.agent is not None else SILENCE
        return Output(pcm=pcm, user=frame.user, text=text, index=frame.index, from_model=frame.agent is not None,
                      text_id=frame.text_id)

    def _flush_recording(self) -> None:
        """Write handed-out frames to the recording, in order, on the calling thread."""
        with self._record_lock:
            self._to_record += self.port.spent()
            recording = self._recording
            if recording is None:
                del self._to_record[:-UNBOUND_BACKLOG]
                return
            batch, self._to_record = self._to_record, []
            for frame in batch:
                self._record(recording, frame)

    def _record(self, recording: CallRecording, frame: CallFrame) -> None:
        gap = frame.arrived - self._recorded_until
        if gap > GAP_TOLERANCE_S and recording.frames:
            recording.add_silence(round(gap / FRAME_S) - 1)
        self._recorded_until = max(self._recorded_until, frame.arrived) + FRAME_S
        text = self.words.caption(frame.text_id) if frame.text_id is not None else ""
        recording.add(frame.user, frame.agent, text)
