"""The long-call probe (benchmarks/long_call.py) on the tiny checkpoint with a short context:
the scripted call, both runs, what it writes, and where the two runs part."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import long_call
from personaplex.model.config import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE
from personaplex.runtime.audio import read_audio

from .helpers import CHECKPOINT, TINY_CONFIG

CONTEXT = 400  # frames: the tiny prompt (about 300 frames) slides out after a few seconds
MINUTES = 0.5


def test_the_script_asks_at_minute_six_for_facts_only_the_role_prompt_gives():
    script = long_call.load_script()
    assert script.minutes == 8
    times = [t.at_s for t in script.turns]
    assert times == sorted(times) and times[-1] < script.minutes * 60
    question = next(t for t in script.turns if t.at_s == 360)
    assert "name" in question.text and "restaurant" in question.text
    assert "Marco" in script.role and "Luigi's Trattoria" in script.role
    for turn in script.turns:  # recorded speech, short, ending before the next turn
        speech = read_audio(turn.file)
        assert 1.0 < speech.size / SAMPLE_RATE < 8.0 and np.abs(speech).max() > 0.1
    for turn, after in zip(script.turns, script.turns[1:]):
        assert turn.at_s + read_audio(turn.file).size / SAMPLE_RATE < after.at_s


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("long_call")
    config = json.loads(TINY_CONFIG.read_text())
    config["lm"]["context"] = CONTEXT
    (folder / "config.json").write_text(json.dumps(config))
    out = folder / "out"
    long_call.main(["--checkpoint", str(CHECKPOINT), "--config", str(folder / "config.json"), "--voice", "TESTV0",
                    "--minutes", str(MINUTES), "--device", "cpu", "--out", str(out), "--rows", str(folder / "rows.jsonl")])
    return out


def test_both_runs_write_the_call_audio_and_text(probe):
    samples = round(MINUTES * 60 * SAMPLE_RATE)
    user = read_audio(probe / "user.wav")
    assert user.size == samples
    for name in long_call.RUNS:
        assert read_audio(probe / name / "agent.wav").size == samples
        labels = json.loads((probe / name / "text.json").read_text())
        assert len(labels) == -(-samples // FRAME_SIZE) and all(isinstance(label, str) for label in labels)
    script = long_call.load_script()
    table = (probe / "side_by_side.md").read_text()
    spoken = [t for t in script.turns if t.at_s < MINUTES * 60]
    assert spoken and all(t.text in table for t in spoken)
    assert table.count("\n| ") == 1 + len(spoken) + 1  # header, the greeting, one row a turn


def test_the_runs_are_the_same_call_until_the_prompt_slides_out(probe):
    summary = json.loads((probe / "summary.json").read_text())
    slides_out = (CONTEXT - summary["prompt_frames"] + 1) / FRAME_RATE
    assert summary["prompt_slides_out_at_s"] == pytest.approx(slides_out)
    assert 0 < slides_out < MINUTES * 60
    # Identical up to there (the same seeded call), then the pinned run still sees its prompt.
    assert summary["same_audio_until_s"] >= slides_out and summary["same_text_until_s"] >= slides_out
    sliding, pinned = (read_audio(probe / name / "agent.wav") for name in long_call.RUNS)
    cut = round(slides_out * FRAME_RATE) * FRAME_SIZE
    np.testing.assert_array_equal(sliding[:cut], pinned[:cut])
    assert not np.array_equal(sliding, pinned)


def test_each_figure_is_written_as_a_row_the_moment_it_is_measured(probe):
    rows = [json.loads(line) for line in (probe.parent / "rows.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == ["models", "run", "run", "parting"]  # what it started with first
    assert rows[0]["device"] == "cpu" and rows[0]["load_s"] >= 0
    summary = json.loads((probe / "summary.json").read_text())
    for row, name in zip(rows[1:3], long_call.RUNS):
        assert row["run"] == name and {k: row[k] for k in summary["runs"][name]} == summary["runs"][name]
    assert rows[3]["prompt_slides_out_at_s"] == summary["prompt_slides_out_at_s"]
