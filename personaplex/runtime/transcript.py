"""A call as people read it: who spoke when, and what the model said.

Implements:
  * `level_db`: a frame's loudness in dBFS (the RMS of its samples);
  * `Turn`, `Transcript`: the conversation as turns with start times, in the order they began.
    The model's turns come from its words (a new turn after `model_pause_s` without one); the
    user's from the loudness of their audio (speech louder than `SPEECH_DB`, a new turn after
    `user_pause_s` of quiet): nothing transcribes the user, so their turns say how long they
    spoke. User turns shorter than `MIN_USER_TURN_S` (a click, a cough) are not shown.
The live captions and the downloadable transcript are both a `Transcript`, so they read alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model.config import FRAME_S
from .audio import SPEECH_DB

MODEL_PAUSE_S = 1.5  # no new words this long: the model's next words start a new turn
USER_PAUSE_S = 0.8  # this much quiet ends a user's turn
MIN_USER_TURN_S = 0.3
MODEL, USER = "Model", "You"


def clock_text(seconds: float) -> str:
    """m:ss"""
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


@dataclass
class Turn:
    speaker: str  # MODEL or USER
    start_s: float
    end_s: float
    text: str = ""  # the model's words; empty for the user (see the module docstring)

    def render(self) -> str:
        if self.speaker == MODEL:
            return self.text.strip()
        return f"(spoke for {self.end_s - self.start_s:.1f} s)"


class Transcript:
    """Turns of both speakers, fed one 80 ms frame at a time; `max_turns` keeps only the latest."""

    def __init__(self, model_pause_s: float = MODEL_PAUSE_S, user_pause_s: float = USER_PAUSE_S,
                 max_turns: int | None = None) -> None:
        self.model_pause_s, self.user_pause_s, self.max_turns = model_pause_s, user_pause_s, max_turns
        self._turns: list[Turn] = []
        self._model: Turn | None = None
        self._user: Turn | None = None

    def add(self, time_s: float, text: str = "", user_db: float | None = None) -> None:
        """The frame starting at `time_s`: the model's words in it, and the user's loudness."""
        if text:
            self._model = self._extend(self._model, MODEL, time_s, self.model_pause_s)
            self._model.text += text if self._model.text else text.lstrip()
        if user_db is not None and user_db > SPEECH_DB:
            self._user = self._extend(self._user, USER, time_s, self.user_pause_s)

    def turns(self) -> list[Turn]:
        return [t for t in self._turns if t.speaker == MODEL or t.end_s - t.start_s >= MIN_USER_TURN_S]

    def render(self) -> str:
        return "".join(f"[{clock_text(t.start_s)}] {t.speaker}: {t.render()}\n" for t in self.turns())

    def _extend(self, turn: Turn | None, speaker: str, time_s: float, pause_s: float) -> Turn:
        """The speaker's current turn, or a new one after a pause; it now lasts to this frame's end."""
        if turn is None or time_s - turn.end_s >= pause_s:
            turn = Turn(speaker, time_s, time_s)
            self._turns.append(turn)
            if self.max_turns is not None:
                del self._turns[: -self.max_turns]
        turn.end_s = time_s + FRAME_S
        return turn
