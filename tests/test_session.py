"""The session's timeline without the UI or a model: a fake clock, and the test plays the engine
on the session's port (`bind`, `go_live`, `take`, `answer`) the way `EngineWorker` does."""

from __future__ import annotations

import asyncio
import threading
import wave

import numpy as np
import pytest

from personaplex.model.config import FRAME_SIZE
from personaplex.runtime.framing import TickGrid
from personaplex.runtime.recording import CallRecording
from personaplex.runtime.session import OFFLINE, REALTIME, Limits, Phase, Session

FRAME_S = 0.08


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeWorker:
    """The engine's side of a port, as `EngineWorker` plays it: its doorbell counts the rings."""

    def __init__(self) -> None:
        self.rings = 0
        self.grid = TickGrid(epoch=0.0)

    def bind(self, session: Session) -> None:
        session.port.bind(0, 10, False, self.ring)

    def ring(self) -> None:
        self.rings += 1


class NamedIds:
    """Text ids read as " w<id>"."""

    def caption(self, text_id: int) -> str:
        return f" w{text_id}"

    def piece(self, text_id: int) -> str:
        return f" w{text_id}"


def live_session(limits: Limits = REALTIME) -> tuple[Session, Clock, FakeWorker]:
    clock, worker = Clock(), FakeWorker()
    session = Session(limits, clock=clock)
    session.words = NamedIds()
    worker.bind(session)
    session.port.go_live(worker.grid)
    return session, clock, worker


def ended_and_rang(session: Session, worker: FakeWorker) -> bool:
    """The call ended and told the engine (which then frees its slot)."""
    rings = worker.rings
    session.end("stopped", "again")  # a second end changes nothing and rings nothing
    return session.port.ended and rings > 0 and worker.rings == rings


def user_frame(k: int) -> np.ndarray:
    return np.full(FRAME_SIZE, (k % 1000) / 1000, dtype=np.float32)


def answer(user: np.ndarray) -> np.ndarray:
    return user * 2 + 0.5


def run_engine(session: Session, now: float) -> int:
    """Answer every frame waiting for the engine (the worker ticks while input waits)."""
    done = 0
    while (user := session.port.take(now)) is not None:
        session.port.answer(answer(user), round(float(user[0]) * 1000))
        done += 1
    return done


def drain(session: Session) -> list:
    outs = []
    while (out := session.next(0)) is not None:
        outs.append(out)
    return outs


def test_every_80_ms_pushed_gives_80_ms_out_in_order_even_when_the_engine_stalls():
    session, clock, _ = live_session()
    outs = []
    for k in range(60):
        clock.t = FRAME_S * (k + 1)
        pcm = user_frame(k)
        session.push(pcm[:960])  # 40 ms chunks, as fastrtc hands them over
        session.push(pcm[960:])
        if not 20 <= k < 30:  # the engine is stuck for 0.8 s
            run_engine(session, clock.t)
        outs += drain(session)
    clock.t += 1.0
    outs += drain(session)
    assert [o.index for o in outs] == list(range(60))
    assert all(o.pcm.shape == (FRAME_SIZE,) for o in outs)
    for o in outs:  # the model's answer to its own input frame, or silence
        want = answer(user_frame(o.index)) if o.from_model else np.zeros(FRAME_SIZE, dtype=np.float32)
        np.testing.assert_array_equal(o.pcm, want)
        assert o.text == (f" w{o.index}" if o.from_model else "")
    silent = [o.index for o in outs if not o.from_model]
    assert silent and set(silent) <= set(range(20, 30))  # what waited longer than max_delay_s
    assert session.stats.unheard == len(silent) and session.stats.silent_out == len(silent)


def test_a_client_at_twice_real_time_for_30_s_is_heard_with_under_half_a_second_of_lag():
    session, clock, _ = live_session()
    arrived: dict[int, float] = {}
    played_until, lags = 0.0, []
    for i in range(750):  # 30 s: a whole frame every 40 ms
        clock.t = 0.04 * (i + 1)
        before = session.stats.frames_in
        session.push(user_frame(i))
        if session.stats.frames_in > before:
            arrived[before] = clock.t
        run_engine(session, clock.t)
        for out in drain(session):  # played at real time from when it is handed over
            start = max(clock.t, played_until)
            played_until = start + FRAME_S
            lags.append(start - arrived[out.index])
    assert max(lags) < 0.5
    real_time_frames = 30.0 / FRAME_S
    assert real_time_frames <= session.stats.frames_in <= real_time_frames + REALTIME.burst_frames
    assert session.stats.too_fast == 750 - session.stats.frames_in


def test_the_recording_lasts_as_long_as_the_call_with_dropped_stretches_as_silence(tmp_path):
    session, clock, _ = live_session()
    session.record_to(CallRecording(tmp_path, max_seconds=60))
    t = 0.0
    for k in range(125):  # 10 s of call: the engine stalls for a second, the client pauses 2 s
        t += FRAME_S
        clock.t = t
        if 75 <= k < 100:
            continue  # nothing comes from the client
        session.push(user_frame(k))
        if not 30 <= k < 42:
            run_engine(session, t)
        drain(session)
    clock.t = t + 1.0
    drain(session)
    session.end("stopped", "bye")
    recording = session.recording
    assert session.close().reason == "stopped" and recording.closed.is_set()
    assert abs(recording.seconds - 10.0) <= 0.2
    with wave.open(str(recording.wav_path)) as w:
        assert (w.getnchannels(), w.getframerate()) == (2, 24000)
        stereo = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).reshape(-1, 2)
    assert stereo.shape[0] == recording.frames * FRAME_SIZE
    user, agent = stereo[:, 0].reshape(-1, FRAME_SIZE), stereo[:, 1].reshape(-1, FRAME_SIZE)
    assert (user[35] != 0).all() and (agent[35] == 0).all()  # the user spoke; the stalled model is silent
    assert (agent[50] != 0).all()
    gap = user[80:95]
    assert (gap == 0).all()  # the client's pause
    assert recording.transcript.turns and "w50" in recording.transcript.render()


def test_a_consumer_that_never_fetches_holds_a_bounded_queue_and_loses_nothing_from_the_recording(tmp_path):
    session, clock, _ = live_session()
    session.record_to(CallRecording(tmp_path, max_seconds=60))
    for k in range(100):
        clock.t = FRAME_S * (k + 1)
        session.push(user_frame(k))
        run_engine(session, clock.t)
        assert len(session.port._frames) <= REALTIME.max_pending
    assert session.stats.dropped_out == 100 - REALTIME.max_pending
    session.end("stopped", "bye")
    session.close()
    assert session.recording.frames == 100 and session.recording.model_frames == 100


def test_a_tick_without_input_is_counted_and_answers_nothing():
    session, clock, _ = live_session()
    assert session.port.take(clock.t) is None
    session.port.answer(np.ones(FRAME_SIZE, dtype=np.float32), 5)
    assert session.stats.idle_ticks == 1 and drain(session) == []


def test_input_during_the_system_prompt_is_answered_with_silence_at_once():
    clock, worker = Clock(), FakeWorker()
    session = Session(REALTIME, clock=clock)
    session.push(user_frame(0))  # no slot yet
    worker.bind(session)
    session.push(user_frame(1))  # the prompt is running
    assert session.phase is Phase.STARTING and session.port.take(clock.t) is None
    outs = drain(session)
    assert [(o.index, o.from_model) for o in outs] == [(0, False), (1, False)] and session.stats.unheard == 2


def test_a_quiet_client_and_the_time_limit_end_the_session_and_free_its_slot():
    session, clock, worker = live_session()
    clock.t = REALTIME.idle_timeout_s + 0.1
    session.check_limits()
    assert session.ending.reason == "idle" and ended_and_rang(session, worker)
    session.push(user_frame(0))  # after the end: ignored
    assert session.stats.frames_in == 0 and session.next(0) is None

    session, clock, worker = live_session(Limits(time_limit_s=5.0))
    for k in range(70):
        clock.t = FRAME_S * (k + 1)
        session.push(user_frame(k))
    session.next(0)
    assert session.ending.reason == "time limit" and "5 s" in session.ending.message and ended_and_rang(session, worker)


def test_end_keeps_the_first_reason():
    session, _, worker = live_session()
    session.end("refused", "no")
    session.end("stopped", "later")
    assert session.ending.reason == "refused" and ended_and_rang(session, worker)


def test_an_async_consumer_wakes_when_the_engine_answers_from_its_thread():
    session, clock, _ = live_session(Limits(max_delay_s=5.0))
    session.push(user_frame(7))

    async def consume():
        return await session.next_async(2.0)

    threading.Timer(0.2, lambda: run_engine(session, clock.t)).start()
    out = asyncio.run(consume())
    assert out is not None and out.from_model and out.index == 0


@pytest.mark.parametrize("samples", [FRAME_SIZE * 10, FRAME_SIZE * 10 + 7])
def test_a_recording_fed_at_the_engines_pace_loses_nothing(samples):
    session, clock, _ = live_session(OFFLINE)
    session.push(np.ones(samples, dtype=np.float32), final=True)
    frames = -(-samples // FRAME_SIZE)
    clock.t = 100.0  # no deadlines
    assert run_engine(session, clock.t) == frames
    outs = drain(session)
    assert [o.index for o in outs] == list(range(frames)) and all(o.from_model for o in outs)


def test_the_tick_grid():
    grid = TickGrid(epoch=1.0, period_s=0.08)
    assert grid.after(1.0) == pytest.approx(1.08) and grid.after(1.05) == pytest.approx(1.08)
    assert grid.at_or_after(1.0) == pytest.approx(1.0) and grid.at_or_after(1.01) == pytest.approx(1.08)
    assert grid.after(0.95) == pytest.approx(1.0)


@pytest.mark.parametrize("phase_s", [0.0, 0.02, 0.04, 0.06])
@pytest.mark.parametrize("chunk", [480, 960])  # 20 ms packets, and 40 ms chunks
def test_the_framing_shifts_once_so_frames_end_just_before_the_ticks_keeping_every_sample(phase_s, chunk):
    from personaplex.runtime.framing import ALIGN_LEAD_S

    clock, worker = Clock(), FakeWorker()  # ticks at k * 80 ms
    session = Session(REALTIME, clock=clock)
    worker.bind(session)
    raw = np.arange(1, 200 * chunk + 1, dtype=np.float32) / (200 * chunk)  # every sample different, none zero
    chunk_s, ends, outs = chunk / 24000, [], []
    for i in range(120):
        clock.t = 1.0 + phase_s + (i + 1) * chunk_s + 0.0003  # the chunk has arrived
        if i == 10:
            session.port.go_live(worker.grid)  # the prompt has run: the next push shifts, from 10 arrivals
        before = session.stats.frames_in
        session.push(raw[i * chunk : (i + 1) * chunk])
        if i == 10:
            assert session.framing_shift is not None and session.port.framing_wait() is not None  # told to the engine
        if session.stats.frames_in > before and i > 10:
            ends.append(clock.t)
        run_engine(session, clock.t)
        outs += drain(session)
    assert session.framing_shift is not None and 0 <= session.framing_shift < FRAME_SIZE
    waits = [worker.grid.after(t + ALIGN_LEAD_S) - t for t in ends]
    assert max(waits) <= ALIGN_LEAD_S + chunk_s + 1e-6  # at most one chunk before the tick it makes
    heard = np.concatenate([o.user for o in outs])
    zeros = np.flatnonzero(heard == 0)
    assert zeros.size == session.framing_shift and (zeros.size == 0 or np.all(np.diff(zeros) == 1))  # one run of zeros
    assert np.array_equal(heard[heard != 0], raw[: heard.size - zeros.size])  # every sample, in order


def test_a_backlog_is_skipped_in_a_pause_and_bounded_while_someone_speaks():
    session, clock, _ = live_session()
    quiet, loud = np.zeros(FRAME_SIZE, dtype=np.float32), np.full(FRAME_SIZE, 0.2, dtype=np.float32)
    session.push(np.concatenate([quiet, quiet, quiet]))  # a burst after a stall: three frames at once
    clock.t = FRAME_S + 0.01  # a tick later, two still wait: quiet, so the older ones are skipped
    assert session.port.take(clock.t) is not None and len(session.port._queue) == 0
    assert session.stats.trimmed == 2 and session.stats.unheard == 0
    session.port.answer(quiet, 0)
    clock.t = 1.0
    session.push(np.concatenate([loud] * 4))
    clock.t += FRAME_S + 0.01  # the user speaks: nothing skipped, the backlog stays (at most max_queued)
    assert session.port.take(clock.t) is not None and len(session.port._queue) == 3 and session.stats.unheard == 0
    outs = drain(session)
    assert [o.from_model for o in outs] == [False, False, True]  # the skipped frames are answered with silence
    assert session.stats.silent_out == 0  # and not counted as the model's lateness
