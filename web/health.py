"""A live call's figures for people: who is speaking, and whether the call keeps real time.

Implements:
  * `Activity`: one speaker's loudness, and whether they are speaking now, from the frames of
    audio the session already has (no model work). A speaker counts as speaking for `hold_s`
    after their last loud frame, so the pauses inside a sentence do not flicker;
  * `Verdict`, `Watch`: over the last `window_s` of a live call, "real time" (nothing dropped,
    the engine's tick well inside its 80 ms), "falling behind" (the tick near or over 80 ms, or
    the model's answers coming late), or "dropping audio" (input or output dropped);
  * `CallView`: all of it for one call, fed with the frames the session hands out;
  * `memory`: what the model's window holds now (the persona, how much of the conversation)
    and the warning the page shows 30 s before it is full.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from personaplex.runtime.audio import SILENT_DB, SPEECH_DB, level_db
from personaplex.runtime.transcript import Transcript, clock_text
from personaplex.serve.contract import BEHIND_TICK_MS, FRAME_S, Output, SessionStats

MEMORY_WARNING_S = 30.0  # before the model's window is full


@dataclass(frozen=True)
class Memory:
    held: str  # what the window holds, for the call's figures
    warning: str  # for the page, "" when there is nothing to mind


def memory(context_s: float, prompt_s: float, heard_s: float, keeps_persona: bool) -> Memory:
    """The model's window (`context_s`) after a prompt of `prompt_s` and `heard_s` of the call.
    With `keeps_persona` the prompt stays and the oldest conversation slides out; without, the
    window slides over the prompt too, and the persona fades."""
    room = context_s - prompt_s  # conversation that fits beside the prompt
    left = room - heard_s
    persona = f"the persona ({prompt_s:.0f} s)"
    if left > 0:
        held = f"{persona} and {clock_text(heard_s)} of conversation, of {clock_text(context_s)}"
    elif keeps_persona:
        held = f"full since {clock_text(room)}: {persona} and the last {clock_text(room)} of conversation"
    elif -left < prompt_s:
        held = f"full since {clock_text(room)}: the persona is sliding out"
    else:
        held = f"full since {clock_text(room)}: the persona has slid out, only the last {clock_text(context_s)} of conversation"
    warning = ""
    if left < MEMORY_WARNING_S and keeps_persona and left > 0:
        warning = (f"{clock_text(left)} left before the model's memory is full: from then on it forgets the oldest "
                   "part of the conversation (the persona stays).")
    elif left < MEMORY_WARNING_S and not keeps_persona:
        warning = (f"{clock_text(max(left, 0))} left before the model's memory is full: the persona will start to "
                   "fade. Stop and start again to refresh it.")
    return Memory(held, warning)


class Activity:
    """Loudness (dBFS, smoothed) and speaking-or-not of one side of the call."""

    def __init__(self, hold_s: float = 0.4, smoothing: float = 0.5) -> None:
        self.hold_s, self.smoothing = hold_s, smoothing
        self.level_db = SILENT_DB
        self._last_loud_s = -float("inf")
        self._now_s = 0.0

    def add(self, time_s: float, level_db: float) -> None:
        self.level_db = max(level_db, self.smoothing * self.level_db + (1 - self.smoothing) * level_db)
        self._now_s = time_s
        if level_db > SPEECH_DB:
            self._last_loud_s = time_s

    @property
    def speaking(self) -> bool:
        return self._now_s - self._last_loud_s <= self.hold_s

    @property
    def fraction(self) -> float:
        """The level as 0..1 for a meter (-60 dBFS and below is empty, 0 dBFS is full)."""
        return min(1.0, max(0.0, (self.level_db + 60.0) / 60.0))


class Verdict(enum.Enum):
    REAL_TIME = "real time"
    BEHIND = "falling behind"
    DROPPING = "dropping audio"


@dataclass(frozen=True)
class _Seen:
    time_s: float
    dropped_in: int  # the user's frames the model did not hear
    late_out: int  # the model's frames that came too late or were not taken


def _seen(time_s: float, stats: SessionStats) -> _Seen:
    return _Seen(time_s, stats.too_fast + stats.unheard, stats.silent_out + stats.dropped_out)


class Watch:
    """The verdict over the last `window_s` of a live call (start it when the call goes live:
    input answered with silence while the prompt loads is not a fault)."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self._history: deque[_Seen] = deque()

    def verdict(self, time_s: float, stats: SessionStats, tick_ms: float) -> Verdict:
        now = _seen(time_s, stats)
        self._history.append(now)
        while self._history[0].time_s < time_s - self.window_s:
            self._history.popleft()
        then = self._history[0]
        if now.dropped_in > then.dropped_in or now.late_out > then.late_out:
            return Verdict.DROPPING
        if tick_ms > BEHIND_TICK_MS:
            return Verdict.BEHIND
        return Verdict.REAL_TIME


@dataclass
class CallView:
    """What a page shows of one live call: who is speaking, the conversation so far (the latest
    `max_turns` turns), and the verdict (`update_verdict` while the call is live)."""

    max_turns: int = 50
    user: Activity = field(default_factory=Activity)
    model: Activity = field(default_factory=Activity)
    watch: Watch = field(default_factory=Watch)
    verdict: Verdict | None = None
    captions: Transcript = field(init=False)

    def __post_init__(self) -> None:
        self.captions = Transcript(max_turns=self.max_turns)

    def add(self, out: Output) -> None:
        time_s, user_db = out.index * FRAME_S, level_db(out.user)
        self.user.add(time_s, user_db)
        self.model.add(time_s, level_db(out.pcm) if out.from_model else SILENT_DB)
        self.captions.add(time_s, out.text, user_db)

    def update_verdict(self, time_s: float, stats: SessionStats, tick_ms: float) -> None:
        self.verdict = self.watch.verdict(time_s, stats, tick_ms)
