"""The service behind the page: loading in the background, and every problem in the status line."""

from __future__ import annotations

import pytest
import torch

from personaplex.model.loading import CheckpointError
from personaplex.runtime import capacity
from personaplex.serve import service as service_module
from personaplex.serve.contract import CallSettings, State
from personaplex.serve.service import Service, Settings

from .helpers import CHECKPOINT, TINY_CONFIG


def status_after_start(settings: Settings):
    svc = Service(settings)
    svc.start()
    return svc.wait_ready(60)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_the_7b_model_without_a_gpu_is_refused_before_any_download(monkeypatch):
    monkeypatch.setattr(service_module, "resolve_checkpoint", lambda *a: pytest.fail("nothing may be downloaded"))
    status = status_after_start(Settings())
    assert status.state is State.FAILED and "no CUDA GPU found" in status.message and "--device cpu" in status.message


def test_a_download_problem_is_shown_as_said(monkeypatch):
    def gated(*args):
        raise CheckpointError("nvidia/personaplex-7b-v1 is a gated model: accept its license at https://huggingface.co/...")

    monkeypatch.setattr(service_module, "resolve_checkpoint", gated)
    status = status_after_start(Settings(device="cpu", config=str(TINY_CONFIG)))
    assert status.state is State.FAILED and status.message.startswith("nvidia/personaplex-7b-v1 is a gated model")


def test_an_unexpected_failure_does_not_leave_the_page_waiting(monkeypatch):
    def broken(*args, **kwargs):
        raise ImportError("no module named sentencepiece")

    monkeypatch.setattr(service_module, "load_models", broken)
    status = status_after_start(Settings(checkpoint=str(CHECKPOINT), config=str(TINY_CONFIG), device="cpu"))
    assert status.state is State.FAILED and "ImportError: no module named sentencepiece" in status.message


def test_missing_files_are_named(tmp_path):
    status = status_after_start(Settings(checkpoint=str(tmp_path), config=str(TINY_CONFIG), device="cpu"))
    assert status.state is State.FAILED and "missing model.safetensors" in status.message


def test_the_tiny_model_comes_up_ready():
    svc = Service(Settings(checkpoint=str(CHECKPOINT), config=str(TINY_CONFIG), device="cpu", max_sessions=3))
    svc.start()
    status = svc.wait_ready(60)
    try:
        assert status.ready and "3 conversation slots" in status.message and status.frame_ms > 0
        assert svc.voice_names() == ["TESTV0"]
    finally:
        svc.worker.stop()


def test_a_voice_stored_as_audio_is_encoded_on_the_engine_thread(tmp_path):
    from personaplex.runtime.session import Phase, Session

    from .helpers import copy_checkpoint

    folder = copy_checkpoint(tmp_path / "ckpt", skip=("TESTV0.pt",))
    svc = Service(Settings(checkpoint=str(folder), config=str(TINY_CONFIG), device="cpu", max_sessions=1))
    svc.start()
    assert svc.wait_ready(60).ready
    try:
        engine_threads = []
        real = svc.engine.voice

        def spy(name):
            import threading

            engine_threads.append(threading.current_thread().name)
            return real(name)

        svc.engine.voice = spy
        session = Session()
        svc.start_call(session, CallSettings("TESTV0", ""))
        assert session.phase in (Phase.STARTING, Phase.LIVE) and session.ending is None
        assert engine_threads == ["personaplex-engine"]
        session.end("stopped", "bye")
    finally:
        svc.worker.stop()


def test_by_default_it_takes_no_more_calls_than_one_tick_serves_in_time(monkeypatch):
    from personaplex.errors import Busy
    from personaplex.runtime.session import Session

    monkeypatch.setattr(capacity, "MAX_TICK_MS", 1e-6)  # every bucket too slow: down to one call
    svc = Service(Settings(checkpoint=str(CHECKPOINT), config=str(TINY_CONFIG), device="cpu"))
    svc.start()
    assert svc.wait_ready(60).ready and svc.engine.num_slots == 4 and svc.worker.max_live == 1
    assert svc.figures().slots == 1 and "with 1 conversation slot;" in svc.status.message
    first = Session()
    svc.start_call(first, CallSettings("TESTV0", ""))
    with pytest.raises(Busy, match="the one conversation slot is in use"):
        svc.start_call(Session(), CallSettings("TESTV0", ""))
    first.end("stopped", "bye")
    svc.worker.stop()


def test_offline_runs_take_a_share_of_the_slots_and_say_when_they_wait():
    """With 4 slots one recording runs at a time; a second waits (and says so) and live calls
    take the other slots meanwhile."""
    import threading

    import numpy as np

    from personaplex.model.config import SamplingParams
    from personaplex.runtime.session import Session

    from .helpers import noise_pcm, start_tiny_service

    svc = start_tiny_service(max_sessions=4)
    user = noise_pcm(250).numpy()  # 20 s: long enough to overlap
    said, results = [], []

    def run(name: str) -> None:
        results.append((name, svc.run_offline(CallSettings("TESTV0", "", SamplingParams(seed=1)), user, waiting=said.append)))

    try:
        first = threading.Thread(target=run, args=("first",))
        first.start()
        while svc.worker.live_sessions == 0:
            threading.Event().wait(0.01)
        second = threading.Thread(target=run, args=("second",))
        second.start()
        calls = [Session() for _ in range(3)]
        for call in calls:  # the three other slots are the live calls'
            svc.start_call(call, CallSettings("TESTV0", "", SamplingParams(seed=2)))
        busy_meanwhile = svc.worker.live_sessions
        for call in calls:
            call.end("stopped", "done")
        first.join(60)
        second.join(60)
    finally:
        svc.stop()
    assert busy_meanwhile == 4 and len(said) == 1 and "waiting" in said[0]
    assert [name for name, _ in results] == ["first", "second"]
    assert all(r.agent.size == user.size and np.abs(r.agent).max() > 0 for _, r in results)


def test_a_custom_voice_is_its_uploaders_alone():
    from .helpers import ROOT, start_tiny_service

    svc = start_tiny_service(max_sessions=1)
    clip = ROOT / "examples" / "voice_sample.wav"
    try:
        mine, again, theirs = (svc.add_custom_voice(clip, page).key for page in ("page-a", "page-a", "page-b"))
    finally:
        svc.stop()
    assert mine == again and mine != theirs  # the same clip from another page is another voice


def test_without_a_gpu_and_no_model_named_the_page_runs_the_tiny_model(tmp_path):
    from personaplex.serve.service import on_the_tiny_model

    from .helpers import CHECKPOINT

    nothing = Settings(max_sessions=3)
    tiny = on_the_tiny_model(nothing, CHECKPOINT)
    if torch.cuda.is_available():
        assert tiny is None
        return
    assert tiny == Settings(str(CHECKPOINT), None, str(CHECKPOINT / "tiny_config.json"), "cpu", 3)
    for asked in (Settings(checkpoint="x"), Settings(hf_repo="a/b"), Settings(config="c.json"), Settings(device="cpu")):
        assert on_the_tiny_model(asked, CHECKPOINT) is None  # a model named is the model loaded
    assert on_the_tiny_model(nothing, tmp_path) is None  # (a tree without the tiny model)
