"""The engine thread with the tiny model: sessions join and leave, busy, slots freed, and no
consumer or stalled job makes another session's audio late."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from personaplex.errors import Busy
from personaplex.model.config import FRAME_SIZE, SamplingParams
from personaplex.runtime.engine import Engine
from personaplex.runtime.session import OFFLINE, REALTIME, Limits, Phase, Session
from personaplex.runtime.worker import EngineWorker

from .helpers import user_audio


@pytest.fixture
def worker(models):
    w = EngineWorker(Engine(models, num_slots=2))
    yield w
    w.stop()


def persona(engine: Engine, role: str):
    return engine.prompt(engine.voice("TESTV0"), role)


class TextIds:
    """Text ids read as their numbers."""

    def caption(self, text_id: int) -> str:
        return str(text_id)

    def piece(self, text_id: int) -> str:
        return str(text_id)


def open_session(worker: EngineWorker, role: str = "", limits: Limits = REALTIME, sampling: SamplingParams | None = None) -> Session:
    session = Session(limits)
    session.words = TextIds()
    worker.open(session.port, worker.engine.prepare(persona(worker.engine, role)), sampling or SamplingParams(greedy=True))
    return session


def wait_live(session: Session, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while session.phase is Phase.STARTING and time.monotonic() < deadline:
        time.sleep(0.01)
    assert session.phase is Phase.LIVE, session.ending


def test_sessions_through_the_worker_match_the_engine_alone(models, worker):
    audio = {r: user_audio(10, seed=i) for i, r in enumerate(["You enjoy having a good conversation.", ""])}
    runs = []
    for role, frames in audio.items():
        session = open_session(worker, role, OFFLINE)
        session.push(torch.cat(frames).numpy(), final=True)
        runs.append(session)
    got = []
    for session in runs:
        outs = []
        while len(outs) < 10:
            out = session.next(10.0)
            assert out is not None, session.ending
            outs.append(out)
        got.append(outs)
        session.end("stopped", "done")
    assert worker.live_sessions == 0
    worker.stop()  # the engine below takes over the models' streaming state
    for outs, (role, frames) in zip(got, audio.items()):
        solo = Engine(models, num_slots=1)
        solo.start(0, persona(solo, role), SamplingParams(greedy=True))
        want = [solo.step(f[None]) for f in frames]
        assert [o.text for o in outs] == [str(int(w.text[0])) for w in want]
        np.testing.assert_allclose(np.stack([o.pcm for o in outs]), np.stack([w.pcm[0].numpy() for w in want]), atol=1e-5)
        assert [o.index for o in outs] == list(range(10))


def test_busy_when_every_slot_is_taken_and_free_again_after_the_end(worker):
    a, b = open_session(worker), open_session(worker)
    with pytest.raises(Busy, match="all 2 conversation slots are in use"):
        open_session(worker)
    a.end("stopped", "bye")
    c = open_session(worker)
    assert c.slot == a.slot
    for s in (b, c):
        s.end("stopped", "bye")
    assert worker.live_sessions == 0


def test_a_consumer_that_blocks_for_a_second_delays_no_other_sessions_frames(worker):
    blocked, other = open_session(worker), open_session(worker)
    wait_live(blocked)
    wait_live(other)
    frames = [f.numpy() for f in user_audio(30, seed=3)]
    pushed_at: dict[int, float] = {}
    delays: list[float] = []

    def consume_other() -> None:
        while len(delays) < len(frames):
            out = other.next(2.0)
            assert out is not None
            delays.append(time.monotonic() - pushed_at[out.index])

    reader = threading.Thread(target=consume_other)
    reader.start()
    start = time.monotonic()
    for k, frame in enumerate(frames):  # real time; `blocked`'s consumer takes nothing for 1.2 s
        time.sleep(max(0.0, start + k * 0.08 - time.monotonic()))
        pushed_at[k] = time.monotonic()
        blocked.push(frame)
        other.push(frame)
    reader.join(10)
    assert len(delays) == len(frames)
    assert other.stats.silent_out == 0 and other.stats.unheard == 0  # every frame answered by the model
    assert max(delays) < REALTIME.max_delay_s  # and in time
    assert blocked.stats.frames_in == len(frames) and len(blocked.port._frames) <= REALTIME.max_pending
    for s in (blocked, other):
        s.end("stopped", "bye")


def test_a_stalled_engine_answers_with_silence_instead_of_growing_the_lag(worker):
    session = open_session(worker)
    wait_live(session)
    outs: list = []
    reader = threading.Thread(target=lambda: outs.extend(o for _ in range(12) if (o := session.next(2.0)) is not None))
    reader.start()
    gate = threading.Event()
    worker.call(gate.wait)  # the engine thread is busy elsewhere for about a second
    for k, frame in enumerate(user_audio(12, seed=5)):
        session.push(frame.numpy())
        time.sleep(0.08)
        if k == 9:
            gate.set()
    reader.join(10)
    assert [o.index for o in outs] == list(range(12))
    assert not all(o.from_model for o in outs[:8]) and session.stats.unheard >= 4  # waited too long: silence, not lag
    assert outs[-1].from_model  # the engine is back: the model answers again
    session.end("stopped", "bye")


def test_a_vanished_client_frees_its_slot(worker):
    session = open_session(worker, limits=Limits(idle_timeout_s=0.5))
    wait_live(session)
    session.push(np.zeros(FRAME_SIZE, dtype=np.float32))
    deadline = time.monotonic() + 3
    while session.phase is not Phase.ENDED and time.monotonic() < deadline:
        time.sleep(0.02)
    assert session.ending.reason == "idle" and worker.live_sessions == 0


def test_a_bad_prompt_is_refused_before_it_takes_a_slot(worker):
    from personaplex.model.persona import PromptError

    empty = persona(worker.engine, "")
    empty = type(empty)(tokens=empty.tokens[:, :0])  # a prompt without frames cannot start
    with pytest.raises(PromptError, match="a prompt needs 2 to"):
        worker.open(Session().port, worker.engine.prepare(empty), SamplingParams())
    assert worker.live_sessions == 0


def test_a_prompt_failing_on_the_engine_thread_ends_the_session_and_frees_the_slot(worker, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(worker.engine, "start_pieces", broken)
    session = open_session(worker)
    deadline = time.monotonic() + 5
    while session.phase is not Phase.ENDED and time.monotonic() < deadline:
        time.sleep(0.01)
    assert session.ending.reason == "error" and "device lost" in session.ending.message
    assert worker.live_sessions == 0


def test_a_session_ended_before_its_prompt_ran_leaves_its_slot_alone(worker):
    gate = threading.Event()
    worker.call(gate.wait)  # the engine thread is busy: prompts wait in the queue
    first = open_session(worker)
    first.end("stopped", "bye")
    second = open_session(worker, "You enjoy having a good conversation.")
    assert second.slot == first.slot
    gate.set()
    wait_live(second)
    second.push(user_audio(1, seed=1)[0].numpy())
    out = second.next(5.0)
    assert out is not None and out.index == 0 and out.from_model
    second.end("stopped", "bye")


def test_stopping_the_worker_ends_every_session(models):
    worker = EngineWorker(Engine(models, num_slots=1))
    session = open_session(worker)
    worker.stop()
    assert session.ending.reason == "shutdown" and worker.live_sessions == 0


def feed_in_real_time(session: Session, frames: int, seed: int = 0) -> threading.Thread:
    def run() -> None:
        start = time.monotonic()
        for k, frame in enumerate(user_audio(frames, seed=seed)):
            time.sleep(max(0.0, start + k * 0.08 - time.monotonic()))
            session.push(frame.numpy())

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_long_job_runs_in_pieces_between_the_ticks_of_a_live_call(worker):
    session = open_session(worker)
    wait_live(session)
    events: list[str] = []
    original = worker._tick
    worker._tick = lambda live: (events.append("tick"), original(live))  # type: ignore[method-assign]

    def job():
        for _ in range(40):
            events.append("piece")
            time.sleep(0.01)  # a piece of work: 10 ms
            yield
        return "done"

    feeder = feed_in_real_time(session, 40)
    result = worker.run(job())
    assert result.result(20) == "done"
    feeder.join()
    session.end("stopped", "bye")
    first, last = events.index("piece"), len(events) - 1 - events[::-1].index("piece")
    between = events[first:last]
    assert between.count("tick") >= 5  # the call kept ticking while the job ran
    runs = "".join("p" if e == "piece" else "t" for e in between).split("t")
    assert max(len(r) for r in runs) <= 8  # no more pieces in a row than fit between two ticks (80 ms / 10 ms)


def test_a_joining_call_goes_ahead_of_a_voice_being_encoded(worker):
    from personaplex.runtime.audio import normalize_loudness, read_audio

    from .helpers import ROOT

    clip = normalize_loudness(np.tile(read_audio(ROOT / "examples" / "voice_sample.wav"), 3))  # 26 s
    encoding = worker.run(worker.engine.voice_pieces(clip, frames=1))
    time.sleep(0.05)  # it has started
    session = open_session(worker)
    wait_live(session, timeout=20)
    assert not encoding.done()  # the call is live while the voice is still being encoded
    assert encoding.result(60).codes.shape[1] == -(-clip.size // FRAME_SIZE)
    session.end("stopped", "bye")


def test_a_lone_call_in_a_high_slot_moves_down_and_goes_on_unchanged(models, worker):
    first, second = open_session(worker), open_session(worker, "You enjoy having a good conversation.", OFFLINE)
    wait_live(first)
    wait_live(second)
    assert (first.slot, second.slot) == (0, 1)
    first.end("stopped", "bye")
    frames = user_audio(10, seed=4)
    second.push(torch.cat(frames).numpy(), final=True)
    outs = [second.next(10.0) for _ in range(10)]
    assert second.slot == 0 and all(o is not None for o in outs)  # moved: every tick now steps one slot
    second.end("stopped", "done")
    worker.stop()
    solo = Engine(models, num_slots=1)
    solo.start(0, persona(solo, "You enjoy having a good conversation."), SamplingParams(greedy=True))
    want = [solo.step(f[None]) for f in frames]
    assert [o.text for o in outs] == [str(int(w.text[0])) for w in want]
    np.testing.assert_allclose(np.stack([o.pcm for o in outs]), np.stack([w.pcm[0].numpy() for w in want]), atol=1e-5)


def test_the_ticks_move_to_a_call_that_is_alone_and_stay_for_the_next(worker):
    from personaplex.runtime.framing import ALIGN_LEAD_S
    from personaplex.runtime.worker import GRID_FIT_MARGIN_S

    first, second = open_session(worker), open_session(worker)
    wait_live(first)
    wait_live(second)
    epoch = worker.grid.epoch
    first.port.framing_chosen(0.03)  # not alone: the grid stays for the other
    deadline = time.monotonic() + 2
    while first.port._framing_wait is not None and time.monotonic() < deadline:
        time.sleep(0.01)  # the worker has read it
    assert first.port._framing_wait is None and worker.grid.epoch == epoch
    second.end("stopped", "bye")
    first.port.framing_chosen(0.03)  # alone: its frames waited 30 ms, now lead and margin
    want = pytest.approx(epoch - (0.03 - ALIGN_LEAD_S - GRID_FIT_MARGIN_S))
    deadline = time.monotonic() + 2
    while worker.grid.epoch != want and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.grid.epoch == want
    first.end("stopped", "bye")


def test_a_free_slot_in_the_bucket_is_parked_its_attention_window_left_empty(models):
    worker = EngineWorker(Engine(models, num_slots=4))
    try:
        sessions = [open_session(worker, limits=OFFLINE) for _ in range(3)]  # slots 0..2: every tick steps 4
        for session in sessions:
            wait_live(session)
            session.push(torch.cat(user_audio(5, seed=1)).numpy(), final=True)
        for session in sessions:
            assert all(session.next(10.0) is not None for _ in range(5))
        state = worker.engine.models.lm.transformer.state
        offsets = worker.call(lambda: state.offset.tolist()).result(10)
        assert offsets[3] == 0 and min(offsets[:3]) > 5  # prompt and frames in; the free slot holds nothing
    finally:
        worker.stop()


def test_a_call_joining_while_a_recording_runs_goes_live_at_once(worker):
    """A recording ticks back to back; a joining call's prompt still runs between two of its
    ticks, instead of waiting for the whole recording (minutes of silence for the caller)."""
    recording = open_session(worker, "", OFFLINE)
    recording.push(np.concatenate([f.numpy() for f in user_audio(1500, seed=3)]), final=True)  # 2 minutes
    assert recording.next(10.0) is not None  # it runs
    call = open_session(worker, "You enjoy having a good conversation.")
    started = time.monotonic()
    while call.phase is Phase.STARTING and time.monotonic() - started < 10:
        call.push(np.zeros(FRAME_SIZE, dtype=np.float32))
        time.sleep(0.02)
    assert call.phase is Phase.LIVE and time.monotonic() - started < 3.0
    assert recording.stats.frames_out < 1500  # long before the recording was done
    recording.end("stopped", "done")
    call.end("stopped", "done")
