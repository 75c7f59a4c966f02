"""EngineWorker: one thread owns the device and steps every live conversation together.

Implements:
  * `EngineWorker`: the engine thread. Each tick it takes one input frame from every live
    session and runs one batched `Engine.step` over the smallest slot range that holds them,
    then hands each session its answer. Between ticks it runs jobs (a session's system prompt,
    a custom voice's encoding) in pieces, as many as fit before the next tick, and moves a
    conversation to a lower slot when that shrinks every tick's bucket, and parks the free
    slots of the bucket (`Engine.park`: their attention stays empty). It runs no app code: a
    session's consumers build text and recordings on their own threads (`personaplex.session`);
  * `Busy`: every slot is taken.

The schedule. While a real-time session is live, ticks keep to a fixed grid (`TickGrid`, one
point every 80 ms): a tick runs at the first grid point where some session has a frame, and
each real-time session shifts its framing once so that its frames are complete just before
the grid points (`Session`), so no session waits for another; a call that is alone moves the
grid to its own frames. A session whose frame is late
hears silence for that tick; nobody waits for it. With only sessions fed from a recording
(offline runs, voice previews), ticks run back to back, a job's piece after each. A job's pieces run in the time left
before the next tick; one piece always runs after a tick (and after a period without one), so a
job moves on even when no piece fits. The worker also ends sessions whose client went quiet or whose time is up
(`Session.check_limits`), so a vanished consumer cannot keep a slot.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .config import FRAME_SIZE
from .engine import Engine
from .errors import UserError
from .framing import ALIGN_LEAD_S, TickGrid
from .generate import PromptPlan
from .sampling import SamplingParams
from .session import Phase, Session

logger = logging.getLogger(__name__)

IDLE_POLL_S = 0.5  # with nothing to do, limits are still checked this often
PIECE_GUARD_S = 0.001  # a piece must end this long before the next tick to run before it
GRID_STEP_MIN_S = 0.001  # a lone call's frames waiting less than this longer than needed: the grid stays
GRID_FIT_MARGIN_S = 0.003  # when the grid moves to a lone call, room for the next calls' pushes to come a little later


class Busy(UserError):
    """No free conversation slot."""


@dataclass(eq=False)
class _Job:
    """Work for the engine thread in pieces; `future` gets the generator's return value."""

    pieces: Iterator[Any]
    future: Future
    urgent: bool = False
    piece_s: float = 0.0  # the longest piece so far: what the next one is expected to take
    started: bool = False


def _once(fn: Callable[[], Any]) -> Generator[None, None, Any]:
    """A job of one piece."""
    yield from ()
    return fn()


@dataclass
class _Plan:
    """What the engine thread does next: a tick over `live`, a piece of `job`, or stop."""

    live: list[Session] = field(default_factory=list)
    job: _Job | None = None
    stop: bool = False


class EngineWorker:
    def __init__(self, engine: Engine, grid: TickGrid | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.grid = grid or TickGrid(epoch=clock())
        self.last_tick_ms = 0.0
        self.max_live = engine.num_slots  # conversations at once (fewer when a full tick would be too slow)
        self._clock = clock
        self._cond = threading.Condition()
        self._jobs: collections.deque[_Job] = collections.deque()
        self._sessions: dict[int, Session] = {}  # slot -> session
        self._due = -float("inf")  # no tick before this grid point (the one after the last tick)
        self._pieces_since_tick = 0
        self._last_tick = -float("inf")
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="personaplex-engine", daemon=True)
        self._thread.start()

    # --- used from other threads ---------------------------------------------------------
    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine thread between two ticks; its result comes through the future."""
        return self.run(_once(fn))

    def run(self, pieces: Iterator[Any], urgent: bool = False) -> Future:
        """Run a generator on the engine thread, one step (piece) at a time between ticks; its
        return value comes through the future. Jobs run one after another, in order, except
        that an urgent one (a caller waiting to hear the model: a system prompt) goes ahead
        of the others, between two of their pieces. Urgent jobs must not share state with the
        others (prompts use their own, see `Engine.start_pieces`)."""
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is stopped")
            self._jobs.append(_Job(pieces, future, urgent=urgent))
            self._cond.notify()
        return future

    def open(self, session: Session, plan: PromptPlan, sampling: SamplingParams, describe: Callable[[int], str],
             keep_persona: bool = False) -> None:
        """Give `session` a slot and queue its system prompt (`Engine.plan`; kept for the whole
        call with `keep_persona`, see `Engine.start`); it goes live once the prompt has run. Raises `Busy` when every slot is taken; a prompt failing on the
        engine thread ends the session with reason "error". `describe` turns a text id into
        words (on the session's threads)."""
        with self._cond:
            if session.phase is Phase.ENDED:
                return
            free = [s for s in range(self.engine.num_slots) if s not in self._sessions]
            if not free or len(self._sessions) >= self.max_live:
                n = min(self.engine.num_slots, self.max_live)
                taken = f"all {n} conversation slots are" if n > 1 else "the one conversation slot is"
                raise Busy(f"{taken} in use: try again in a minute")
            session._bind(self, free[0], plan.offset, describe, keep_persona)
            self._sessions[free[0]] = session

        def start() -> Generator[None, None, None]:
            if session.phase is Phase.ENDED:  # ended before its turn: its slot may be someone else's now
                return
            try:
                yield from self.engine.start_pieces(session.slot, plan, sampling, keep_persona=keep_persona)  # type: ignore[arg-type]
            except Exception as exc:
                logger.exception("session in slot %s: its system prompt failed", session.slot)
                session.end("error", f"the call could not start: {exc}")
                raise
            if session.phase is not Phase.ENDED:
                wait = session._go_live()
                if wait is not None:
                    self._fit_grid(session, wait)

        self.run(start(), urgent=True)

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
                plan = self._next_work()
                if plan.stop:
                    return
                if plan.job is not None:
                    self._piece(plan.job)
                else:
                    self._tick(plan.live)
                    self._compact()
                    self._park_free()

    def _next_work(self) -> _Plan:
        """Block until there is a tick or a piece of a job to run."""
        with self._cond:
            while True:
                if self._stopping:
                    return _Plan(stop=True)
                for session in list(self._sessions.values()):
                    session.check_limits()
                now = self._clock()
                live = [s for s in self._sessions.values() if s.phase is Phase.LIVE]
                realtime = any(s.limits.realtime for s in live)
                pending = any(s._input_state(now) is not None for s in live)
                job = next((j for j in self._jobs if j.urgent), self._jobs[0] if self._jobs else None)
                if pending and not realtime and job is not None and self._pieces_since_tick == 0:
                    return _Plan(job=job)  # recordings tick back to back, but a joining call's prompt goes on between
                if pending and (not realtime or now >= self._due):
                    return _Plan(live=live)
                next_tick = self._next_tick(now, pending) if realtime else (now if pending else float("inf"))
                if job is not None and (self._pieces_since_tick == 0 or now - self._last_tick >= self.grid.period_s
                                        or now + job.piece_s <= next_tick - PIECE_GUARD_S):
                    return _Plan(job=job)
                self._cond.wait(timeout=max(0.0, min(next_tick - now, IDLE_POLL_S)))

    def _next_tick(self, now: float, pending: bool) -> float:
        """When the next real-time tick runs: at the due grid point if a frame waits, else at
        the first grid point from then or now (frames are aligned to come just before it)."""
        if pending:
            return self._due
        return self.grid.at_or_after(max(self._due, now))

    def _piece(self, job: _Job) -> None:
        """One piece of `job`; the job leaves the queue when it is done or fails."""
        if not job.started:
            job.started = True
            if not job.future.set_running_or_notify_cancel():
                self._finish(job)
                return
        begun = time.perf_counter()
        try:
            next(job.pieces)
        except StopIteration as done:
            job.future.set_result(done.value)
            self._finish(job)
        except BaseException as exc:  # reported through the future
            job.future.set_exception(exc)
            self._finish(job)
        job.piece_s = max(job.piece_s, time.perf_counter() - begun)
        self._pieces_since_tick += 1

    def _finish(self, job: _Job) -> None:
        with self._cond:
            self._jobs.remove(job)

    def _tick(self, live: list[Session]) -> None:
        now = self._clock()
        self._due = self.grid.after(now)
        self._last_tick, self._pieces_since_tick = now, 0
        bucket = self.engine.bucket_for(max(s.slot for s in live) + 1)  # type: ignore[type-var]
        batch = np.zeros((bucket, FRAME_SIZE), dtype=np.float32)
        for session in live:
            frame = session._take(now)
            if frame is not None:
                batch[session.slot] = frame
        start = time.perf_counter()
        out = self.engine.step_host(batch, bucket)
        while not out.ready():  # the GPU works; this thread sleeps, so the event loop serving
            time.sleep(0.0002)  # every connection (WebRTC, Opus) keeps the interpreter meanwhile
        self.last_tick_ms = (time.perf_counter() - start) * 1000
        for session in live:
            session._deliver(out.pcm[session.slot].copy(), int(out.text[session.slot]))

    def _fit_grid(self, session: Session, wait: float) -> None:
        """A real-time call that is alone moves the ticks to its frames: they come `wait` after
        its frames are complete, `ALIGN_LEAD_S` (and a margin for the calls that align to it
        later) is enough. With other calls live the grid stays (they are aligned to it)."""
        with self._cond:
            others = [s for s in self._sessions.values() if s is not session and s.phase is Phase.LIVE and s.limits.realtime]
            earlier = wait - ALIGN_LEAD_S - GRID_FIT_MARGIN_S
            if others or not session.limits.realtime or earlier < GRID_STEP_MIN_S:
                return
            self.grid = TickGrid(epoch=self.grid.epoch - earlier, period_s=self.grid.period_s)
            self._due = self.grid.after(self._last_tick) if self._last_tick > -float("inf") else self._due

    def _park_free(self) -> None:
        """Free slots still step in the bucket: park them (`Engine.park`), so that their
        attention windows stay empty instead of filling with silence."""
        with self._cond:
            for slot in range(self.engine.num_slots):
                if slot not in self._sessions:
                    self.engine.park(slot)

    def _compact(self) -> None:
        """Move the live conversation in the highest slot to the lowest free one when that
        makes the bucket of every tick smaller (a copy of one slot's state)."""
        with self._cond:
            if not self._sessions:
                return
            top = max(self._sessions)
            free = [s for s in range(top) if s not in self._sessions]
            session = self._sessions[top]
            if not free or session.phase is not Phase.LIVE:
                return
            engine = self.engine
            if engine.bucket_for(len(self._sessions)) >= engine.bucket_for(top + 1):
                return
            engine.move(top, free[0])
            del self._sessions[top]
            self._sessions[free[0]] = session
            session.slot = free[0]
