"""A live call's figures for people: who is speaking, the verdict on real time, the model's memory."""

from __future__ import annotations

import pytest

from personaplex.model.config import FRAME_S
from personaplex.runtime.audio import SILENT_DB
from personaplex.runtime.session import SessionStats
from web.health import BEHIND_TICK_MS, Activity, Memory, Verdict, Watch, memory


def test_a_speaker_stays_speaking_through_short_pauses_and_stops_after_the_hold():
    a = Activity(hold_s=0.4)
    assert not a.speaking and a.fraction == 0.0
    a.add(0.0, -20.0)
    assert a.speaking and 0.6 < a.fraction < 0.7
    for i in range(1, 5):  # 0.32 s of silence: still inside the hold
        a.add(i * FRAME_S, SILENT_DB)
    assert a.speaking
    a.add(6 * FRAME_S, SILENT_DB)  # 0.48 s after the last loud frame
    assert not a.speaking


def test_the_meter_rises_at_once_and_falls_smoothly():
    a = Activity(smoothing=0.5)
    a.add(0.0, -60.0)
    a.add(FRAME_S, -12.0)
    assert a.level_db == -12.0  # a loud frame shows at once
    a.add(2 * FRAME_S, -60.0)
    assert a.level_db == -36.0  # then halfway down per frame
    a.add(3 * FRAME_S, 6.0)
    assert a.fraction == 1.0


def test_the_verdict_follows_drops_and_the_tick_over_the_last_window():
    w = Watch(window_s=5.0)
    stats = SessionStats()
    assert w.verdict(0.0, stats, 20.0) is Verdict.REAL_TIME
    assert w.verdict(1.0, stats, BEHIND_TICK_MS + 1) is Verdict.BEHIND
    stats.too_fast = 3
    assert w.verdict(2.0, stats, 20.0) is Verdict.DROPPING
    assert w.verdict(6.0, stats, 20.0) is Verdict.DROPPING  # the drop at 2 s is still inside the window
    assert w.verdict(7.5, stats, 20.0) is Verdict.REAL_TIME  # and then it is not
    stats.silent_out = 1  # the model's answer came too late
    assert w.verdict(8.0, stats, 20.0) is Verdict.DROPPING


def test_a_call_view_follows_the_frames_the_session_hands_out():
    import numpy as np

    from personaplex.runtime.session import Output
    from web.health import CallView

    loud, silent = np.full(1920, 0.1, dtype=np.float32), np.zeros(1920, dtype=np.float32)
    view = CallView(max_turns=10)
    for i in range(10):  # the user talks over silence the model was not asked for
        view.add(Output(pcm=silent, user=loud, text="", index=i, from_model=False))
    assert view.user.speaking and not view.model.speaking
    for i in range(10, 20):  # then the model answers
        view.add(Output(pcm=loud, user=silent, text=" hi" if i == 10 else "", index=i, from_model=True))
    assert view.model.speaking and not view.user.speaking
    assert [(t.speaker, t.render()) for t in view.captions.turns()] == [("You", "(spoke for 0.8 s)"), ("Model", "hi")]
    view.update_verdict(1.6, SessionStats(), 20.0)
    assert view.verdict is Verdict.REAL_TIME


@pytest.mark.parametrize("keeps", [True, False], ids=["persona-kept", "persona-fades"])
def test_the_memory_figure_and_warning_follow_the_window(keeps):
    context, prompt = 240.0, 24.0  # the window is full after 216 s of conversation
    early = memory(context, prompt, 60.0, keeps)
    assert early == Memory("the persona (24 s) and 1:00 of conversation, of 4:00", "")
    near = memory(context, prompt, 200.0, keeps)
    assert near.warning.startswith("0:16 left before the model's memory is full")
    assert ("the persona stays" in near.warning) == keeps and ("fade" in near.warning) != keeps
    full = memory(context, prompt, 300.0, keeps)
    if keeps:  # nothing left to warn about: the persona stays, the oldest conversation goes
        assert full == Memory("full since 3:36: the persona (24 s) and the last 3:36 of conversation", "")
    else:
        assert full.held == "full since 3:36: the persona has slid out, only the last 4:00 of conversation"
        assert full.warning.startswith("0:00 left") and "Stop and start again" in full.warning
        assert memory(context, prompt, 230.0, keeps).held == "full since 3:36: the persona is sliding out"
