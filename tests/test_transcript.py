"""The conversation as people read it: turns of both speakers with their start times, built from
the frames a call hands out (the model's words, the user's loudness)."""

from __future__ import annotations

import numpy as np

from personaplex.model.config import FRAME_S
from personaplex.runtime.audio import SILENT_DB, level_db
from personaplex.runtime.transcript import MIN_USER_TURN_S, Transcript, clock_text

LOUD, QUIET = -20.0, -70.0


def feed(transcript: Transcript, frames: list[tuple[str, float]]) -> None:
    """One (model text, user dB) pair per 80 ms frame, from time 0."""
    for i, (text, user_db) in enumerate(frames):
        transcript.add(i * FRAME_S, text, user_db)


def test_level_db_is_the_rms_in_dbfs_and_silence_has_a_floor():
    assert level_db(np.zeros(1920, dtype=np.float32)) == SILENT_DB
    assert level_db(np.zeros(0, dtype=np.float32)) == SILENT_DB
    assert abs(level_db(np.full(1920, 0.1, dtype=np.float32)) - (-20.0)) < 1e-6
    assert abs(level_db(np.full(1920, -1.0, dtype=np.float32))) < 1e-6


def test_the_model_starts_a_new_turn_after_a_pause_in_its_words():
    t = Transcript(model_pause_s=1.5)
    for time_s, piece in [(0.0, " Hello"), (0.4, " there."), (1.0, ""), (3.0, " How"), (3.2, " are"), (3.5, " you?")]:
        t.add(time_s, piece)
    assert t.render() == "[0:00] Model: Hello there.\n[0:03] Model: How are you?\n"


def test_user_turns_come_from_loudness_and_say_how_long_the_user_spoke():
    t = Transcript(user_pause_s=0.8)
    # 1.2 s of speech, 0.4 s of quiet (inside the turn), 0.8 s speech, 2 s quiet, 1 s speech
    frames = [("", LOUD)] * 15 + [("", QUIET)] * 5 + [("", LOUD)] * 10 + [("", QUIET)] * 25 + [("", LOUD)] * 12
    feed(t, frames)
    turns = t.turns()
    assert [(x.speaker, round(x.start_s, 2)) for x in turns] == [("You", 0.0), ("You", 4.4)]
    assert round(turns[0].end_s - turns[0].start_s, 2) == 2.4 and turns[0].render() == "(spoke for 2.4 s)"
    assert t.render().startswith("[0:00] You: (spoke for 2.4 s)\n[0:04] You: (spoke for 1.0 s)\n")


def test_a_click_or_a_cough_is_not_a_turn():
    t = Transcript()
    frames = [("", LOUD)] + [("", QUIET)] * 30 + [(" Yes", QUIET)]
    feed(t, frames)
    assert FRAME_S < MIN_USER_TURN_S and [x.speaker for x in t.turns()] == ["Model"]


def test_both_speakers_interleave_in_the_order_their_turns_began():
    t = Transcript()
    frames = [("", LOUD)] * 10 + [(" Sure,", QUIET), (" I", LOUD), (" can", LOUD)] + [("", QUIET)] * 30 + [("", LOUD)] * 5
    feed(t, frames)
    assert [x.speaker for x in t.turns()] == ["You", "Model", "You"]
    assert t.turns()[1].text == "Sure, I can"  # the barge-in frames keep the model's turn going


def test_live_captions_keep_only_the_latest_turns():
    t = Transcript(model_pause_s=0.5, max_turns=3)
    for i in range(10):
        t.add(i * 1.0, f" turn{i}")
    assert [x.text for x in t.turns()] == ["turn7", "turn8", "turn9"]


def test_clock_text():
    assert [clock_text(s) for s in (0, 9.9, 61, 600)] == ["0:00", "0:09", "1:01", "10:00"]
