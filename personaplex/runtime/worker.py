"""EngineWorker: one thread owns the device and steps every live conversation together.

Implements:
  * `EngineWorker`: the engine thread. Each tick it takes one input frame from every live
    call and runs one batched `Engine.step` over the smallest slot range that holds them,
    then hands each call its answer. Between ticks it runs jobs (a call's system prompt,
    a custom voice's encoding) in pieces, as many as fit before the next tick, and moves a
    conversation to a lower slot when that shrinks every tick's bucket, and parks the free
    slots of the bucket (`Engine.park`: their attention stays empty). It sees a call only
    through its `Port` (`runtime.port`), never the session behind it, and runs no app
    code: a session's consumers build text and recordings on their own threads. When every
    slot is taken, `open` raises `Busy`.

The schedule. While a real-time call is live, ticks keep to a fixed grid (`TickGrid`, one
point every 80 ms): a tick runs at the first grid point where some call has a frame, and
each real-time call shifts its framing once so that its frames are complete just before
the grid points (`runtime.session`), so no call waits for another; a call that is alone
moves the grid to its own frames (`Port.framing_wait`). A call whose frame is late
hears silence for that tick; nobody waits for it. With only calls fed from a recording
(offline runs, voice previews), ticks run back to back, a job's piece after each. A job's pieces run in the time left
before the next tick; one piece always runs after a tick (and after a period without one), so a
job moves on even when no piece fits. The worker also ends calls whose client went quiet or
whose time is up (`Port.expire`), so a vanished consumer cannot keep a slot; a port that has
ended is dropped from its slot the next time the worker looks (its doorbell rings).
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

from ..errors import Busy
from ..model.config import FRAME_SIZE, SamplingParams
from ..model.generate import PreparedPrompt
from .engine import Engine
from .framing import ALIGN_LEAD_S, TickGrid
from .port import Phase, Port

logger = logging.getLogger(__name__)

IDLE_POLL_S = 0.5  # with nothing to do, limits are still checked this often
PIECE_GUARD_S = 0.001  # a piece must end this long before the next tick to run before it
GRID_STEP_MIN_S = 0.001  # a lone call's frames waiting less than this longer than needed: the grid stays
GRID_FIT_MARGIN_S = 0.003  # when the grid moves to a lone call, room for the next calls' pushes to come a little later


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
class _Work:
    """What the engine thread does next: a tick over `live`, a piece of `job`, or stop."""

    live: list[Port] = field(default_factory=list)
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
        self._ports: dict[int, Port] = {}  # slot -> the call in it
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

    def open(self, port: Port, prepared: PreparedPrompt, sampling: SamplingParams, keep_persona: bool = False) -> None:
        """Give the call behind `port` a slot and queue its system prompt (`Engine.prepare`; kept
        for the whole call with `keep_persona`, see `Engine.start`); it goes live once the
        prompt has run. Raises `Busy` when every slot is taken; a prompt failing on the engine
        thread ends the call with reason "error"."""
        with self._cond:
            if port.ended:
                return
            self._drop_ended()
            free = [s for s in range(self.engine.num_slots) if s not in self._ports]
            if not free or len(self._ports) >= self.max_live:
                n = min(self.engine.num_slots, self.max_live)
                taken = f"all {n} conversation slots are" if n > 1 else "the one conversation slot is"
                raise Busy(f"{taken} in use: try again in a minute")
            port.bind(free[0], prepared.offset, keep_persona, self._ring)
            self._ports[free[0]] = port
        self.run(self._start(port, prepared, sampling, keep_persona), urgent=True)

    def _start(self, port: Port, prepared: PreparedPrompt, sampling: SamplingParams, keep_persona: bool) -> Generator[None, None, None]:
        """The engine thread's job for a new call: its system prompt, then live."""
        if port.ended:  # ended before its turn: its slot may be someone else's now
            return
        try:
            yield from self.engine.start_pieces(port.slot, prepared, sampling, keep_persona=keep_persona)  # type: ignore[arg-type]
        except Exception as exc:
            logger.exception("the call in slot %s: its system prompt failed", port.slot)
            port.end("error", f"the call could not start: {exc}")
            raise
        port.go_live(self.grid)

    @property
    def live_sessions(self) -> int:
        """Calls holding a slot now."""
        with self._cond:
            return sum(not p.ended for p in self._ports.values())

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            ports = list(self._ports.values())
            self._cond.notify()
        for port in ports:
            port.end("shutdown", "the server is shutting down")
        self._thread.join(timeout=10)

    def _ring(self) -> None:
        """A port's doorbell: input waits, a framing was chosen, or the call ended."""
        with self._cond:
            self._cond.notify()

    def _drop_ended(self) -> None:
        """Free the slots of the calls that ended (under the lock)."""
        for slot in [s for s, p in self._ports.items() if p.ended]:
            del self._ports[slot]

    # --- the engine thread -------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                work = self._next_work()
                if work.stop:
                    return
                if work.job is not None:
                    self._piece(work.job)
                else:
                    self._tick(work.live)
                    self._compact()
                    self._park_free()

    def _next_work(self) -> _Work:
        """Block until there is a tick or a piece of a job to run."""
        with self._cond:
            while True:
                if self._stopping:
                    return _Work(stop=True)
                for port in list(self._ports.values()):
                    port.expire()
                self._drop_ended()
                self._fit_grid()
                now = self._clock()
                live = [p for p in self._ports.values() if p.phase is Phase.LIVE]
                realtime = any(p.realtime for p in live)
                pending = any(p.waiting_since(now) is not None for p in live)
                job = next((j for j in self._jobs if j.urgent), self._jobs[0] if self._jobs else None)
                if pending and not realtime and job is not None and self._pieces_since_tick == 0:
                    return _Work(job=job)  # recordings tick back to back, but a joining call's prompt goes on between
                if pending and (not realtime or now >= self._due):
                    return _Work(live=live)
                next_tick = self._next_tick(now, pending) if realtime else (now if pending else float("inf"))
                if job is not None and (self._pieces_since_tick == 0 or now - self._last_tick >= self.grid.period_s
                                        or now + job.piece_s <= next_tick - PIECE_GUARD_S):
                    return _Work(job=job)
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

    def _tick(self, live: list[Port]) -> None:
        now = self._clock()
        self._due = self.grid.after(now)
        self._last_tick, self._pieces_since_tick = now, 0
        slots = [(p, p.slot) for p in live]  # (the engine thread alone moves a call to another slot)
        bucket = self.engine.bucket_for(max(slot for _, slot in slots) + 1)  # type: ignore[type-var]
        batch = np.zeros((bucket, FRAME_SIZE), dtype=np.float32)
        for port, slot in slots:
            frame = port.take(now)
            if frame is not None:
                batch[slot] = frame
        start = time.perf_counter()
        out = self.engine.step_host(batch, bucket)
        while not out.ready():  # the GPU works; this thread sleeps, so the event loop serving
            time.sleep(0.0002)  # every connection (WebRTC, Opus) keeps the interpreter meanwhile
        self.last_tick_ms = (time.perf_counter() - start) * 1000
        for port, slot in slots:
            port.answer(out.pcm[slot].copy(), int(out.text[slot]))

    def _fit_grid(self) -> None:
        """A real-time call that is alone moves the ticks to its frames (under the lock): they
        come `wait` after its frames are complete (`Port.framing_wait`), `ALIGN_LEAD_S` (and a
        margin for the calls that align to it later) is enough. With other calls live the grid
        stays (they are aligned to it)."""
        for port in self._ports.values():
            wait = port.framing_wait()
            if wait is None:
                continue
            others = [p for p in self._ports.values() if p is not port and p.phase is Phase.LIVE and p.realtime]
            earlier = wait - ALIGN_LEAD_S - GRID_FIT_MARGIN_S
            if others or not port.realtime or earlier < GRID_STEP_MIN_S:
                continue
            self.grid = TickGrid(epoch=self.grid.epoch - earlier, period_s=self.grid.period_s)
            self._due = self.grid.after(self._last_tick) if self._last_tick > -float("inf") else self._due

    def _park_free(self) -> None:
        """Free slots still step in the bucket: park them (`Engine.park`), so that their
        attention windows stay empty instead of filling with silence."""
        with self._cond:
            for slot in range(self.engine.num_slots):
                if slot not in self._ports:
                    self.engine.park(slot)

    def _compact(self) -> None:
        """Move the live conversation in the highest slot to the lowest free one when that
        makes the bucket of every tick smaller (a copy of one slot's state)."""
        with self._cond:
            self._drop_ended()
            if not self._ports:
                return
            top = max(self._ports)
            free = [s for s in range(top) if s not in self._ports]
            port = self._ports[top]
            if not free or port.phase is not Phase.LIVE:
                return
            engine = self.engine
            if engine.bucket_for(len(self._ports)) >= engine.bucket_for(top + 1):
                return
            engine.move(top, free[0])
            del self._ports[top]
            self._ports[free[0]] = port
            port.move(free[0])
