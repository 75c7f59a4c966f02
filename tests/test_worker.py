"""The engine thread: sessions join and leave, bounded queues, busy, idle slots freed."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from personaplex.config import FRAME_SIZE
from personaplex.engine import Engine
from personaplex.sampling import SamplingParams
from personaplex.worker import Busy, EngineWorker

from .test_invariants import user_audio


@pytest.fixture
def worker(models):
    w = EngineWorker(Engine(models, num_slots=2), max_wait_s=0.05, idle_timeout_s=1.0)
    yield w
    w.stop()


def persona(engine: Engine, role: str):
    return engine.prompt(engine.voice("TESTV0"), role)


def collect(worker, role, frames=None):
    """Open a session (real time without `frames`); return it and the frames it gets."""
    got = []
    session = worker.open_session(persona(worker.engine, role), SamplingParams(greedy=True), got.append, inputs=frames)
    return session, got


def test_sessions_through_the_worker_match_the_engine_alone(models, worker):
    audio = {r: [f.numpy() for f in user_audio(10, seed=i)] for i, r in enumerate(["You enjoy having a good conversation.", ""])}
    runs = [collect(worker, role, frames) for role, frames in audio.items()]
    for session, _ in runs:
        assert session.closed.wait(20) and session.error is None  # closed after its last frame
    assert worker.live_sessions == 0
    worker.stop()  # the engine below takes over the models' streaming state
    for (_, got), (role, frames) in zip(runs, audio.items()):
        solo = Engine(models, num_slots=1)
        solo.start(0, solo.prompt(solo.voice("TESTV0"), role), SamplingParams(greedy=True))
        want = [solo.step(torch.from_numpy(f)[None]) for f in frames]
        assert [o.text_id for o in got] == [int(w.text[0]) for w in want]
        np.testing.assert_allclose(np.stack([o.pcm for o in got]), np.stack([w.pcm[0].numpy() for w in want]), atol=1e-5)
        assert [o.index for o in got] == list(range(len(frames)))


def test_busy_when_every_slot_is_taken_and_free_again_after_close(worker):
    a, _ = collect(worker, "")
    b, _ = collect(worker, "")
    with pytest.raises(Busy, match="all 2 conversation slots are in use"):
        collect(worker, "")
    a.close()
    c, _ = collect(worker, "")
    assert c.slot == a.slot
    for s in (b, c):
        s.close()
    assert worker.live_sessions == 0


def test_a_slow_engine_drops_input_instead_of_growing_latency(worker):
    session, got = collect(worker, "")
    assert session.ready.wait(10)
    gate = threading.Event()
    worker.call(gate.wait)  # the engine thread is busy elsewhere
    for frame in user_audio(10, seed=3):
        session.push(frame.numpy())
    assert session.backlog == worker.max_backlog and session.stats.dropped == 10 - worker.max_backlog
    gate.set()
    deadline = time.monotonic() + 5
    while len(got) < worker.max_backlog and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(got) == worker.max_backlog
    session.close()


def test_a_silent_session_does_not_hold_back_the_others(worker):
    talker, got = collect(worker, "")
    silent, _ = collect(worker, "")
    assert talker.ready.wait(10) and silent.ready.wait(10)
    for frame in user_audio(3, seed=4):
        talker.push(frame.numpy())
        time.sleep(0.08)
    deadline = time.monotonic() + 5
    while len(got) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(got) == 3 and silent.stats.late >= 3 and silent.stats.frames_out == 3
    talker.close()
    silent.close()


def test_a_vanished_client_frees_its_slot(worker):
    session, _ = collect(worker, "")
    assert session.ready.wait(10)
    session.push(np.zeros(FRAME_SIZE, dtype=np.float32))
    assert session.closed.wait(worker.idle_timeout_s + 2)
    assert worker.live_sessions == 0


def test_a_bad_prompt_is_refused_before_it_takes_a_slot(worker):
    from personaplex.persona import PromptError

    empty = persona(worker.engine, "")
    empty = type(empty)(tokens=empty.tokens[:, :0])  # a prompt without frames cannot start
    with pytest.raises(PromptError, match="a prompt needs 2 to"):
        worker.open_session(empty, SamplingParams(), lambda out: None)
    assert worker.live_sessions == 0


def test_a_prompt_failing_on_the_engine_thread_reports_and_frees_the_slot(worker, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(worker.engine, "start", broken)
    session = worker.open_session(persona(worker.engine, ""), SamplingParams(), lambda out: None)
    assert session.ready.wait(10) and session.closed.is_set()
    assert isinstance(session.error, RuntimeError) and worker.live_sessions == 0


def test_a_session_closed_before_its_prompt_ran_leaves_its_slot_alone(worker):
    gate = threading.Event()
    worker.call(gate.wait)  # the engine thread is busy: prompts wait in the queue
    first, _ = collect(worker, "")
    first.close()
    second, got = collect(worker, "You enjoy having a good conversation.")
    assert second.slot == first.slot
    gate.set()
    assert second.ready.wait(10) and not second.closed.is_set()
    second.push(user_audio(1, seed=1)[0].numpy())
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got and got[0].index == 0
    second.close()
