"""The service's contract: what a page or a door may ask of a service, importable without torch.

Implements:
  * `CallService`, the service's interface (a `typing.Protocol`): `Service` implements it with an
    engine in this process, `RemoteService` with the engines of a cluster. A page holds one and
    needs nothing else of the server side;
  * its value types: `State`, `Status`, `Summary`, `EngineFigures`, `CustomVoice`,
    `CallSettings`, `OfflineResult`;
  * its errors: `UserError`, `SettingsError`, `Busy` (`personaplex.errors`), `AudioError`,
    `NotReady`;
  * its limits: a call's real-time rules (`Limits`, `REALTIME`, `OFFLINE`), the role prompt's and
    a voice name's length, a custom voice's upload size and length, the sampling settings' ranges,
    the tick that counts as falling behind; the formats a model may run in (`WEIGHT_FORMATS`,
    `KV_FORMATS`); and the frame a call is counted in (`SAMPLE_RATE`, `FRAME_S`);
  * the checks every service makes the same way: `require_ready`, `read_voice_clip`; and
    `offline_runs`, the share of the slots that offline runs take.
A call is a `Session` (the runtime's, torch-free), handed out here with its value types
(`Output`, `Phase`, `Ending`, `SessionStats`), so that a door imports them from one place.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import Busy, SettingsError, UserError
from ..model.config import (
    DEFAULT_TEXT_PROMPT,
    FRAME_S,
    KV_FORMATS,
    MAX_TOP_K,
    SAMPLE_RATE,
    SEED_MAX,
    WEIGHT_FORMATS,
    SamplingParams,
)
from ..runtime.audio import AudioError, read_audio
from ..runtime.port import OFFLINE, REALTIME, Ending, Limits, Phase, SessionStats
from ..runtime.recording import FileStore
from ..runtime.session import Output, Session
from ..runtime.transcript import Transcript

__all__ = [
    "BEHIND_TICK_MS",
    "CUSTOM_VOICE_PREFIX",
    "CUSTOM_VOICE_SECONDS",
    "DEFAULT_TEXT_PROMPT",
    "FRAME_S",
    "KV_FORMATS",
    "MAX_ROLE_CHARS",
    "MAX_TOP_K",
    "MAX_UPLOAD_BYTES",
    "MAX_VOICE_NAME_CHARS",
    "OFFLINE",
    "REALTIME",
    "SAMPLE_RATE",
    "SEED_MAX",
    "WEIGHT_FORMATS",
    "AudioError",
    "Busy",
    "CallService",
    "CallSettings",
    "CustomVoice",
    "Ending",
    "EngineFigures",
    "FileStore",
    "Limits",
    "NotReady",
    "OfflineResult",
    "Output",
    "Phase",
    "SamplingParams",
    "Session",
    "SessionStats",
    "SettingsError",
    "State",
    "Status",
    "Summary",
    "UserError",
    "offline_runs",
    "read_voice_clip",
    "require_ready",
]

MAX_ROLE_CHARS = 1000  # as the official client
MAX_VOICE_NAME_CHARS = 64  # a voice's name, as a client sends it
CUSTOM_VOICE_SECONDS = (5.0, 30.0)
CUSTOM_VOICE_PREFIX = "custom:"  # then 32 hex digits: the key a service gives an uploaded voice
MAX_UPLOAD_BYTES = 50 * 1024 * 1024
BEHIND_TICK_MS = 0.75 * FRAME_S * 1000  # a tick this long leaves no room: the next hiccup drops audio
FILES_GRACE_S = 60.0  # a new folder of results is not deleted for the count before Gradio has copied it
OFFLINE_SHARE = 4  # offline runs at once: at most one in this many slots, live calls come first


class NotReady(UserError):
    """The model is not loaded (yet)."""


class State(enum.Enum):
    STARTING = "starting"
    DOWNLOADING = "downloading"
    LOADING = "loading"
    WARMING_UP = "warming up"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class Status:
    state: State
    message: str
    frame_ms: float | None = None  # measured compute time of one frame (warm-up tick)

    @property
    def ready(self) -> bool:
        return self.state is State.READY


@dataclass(frozen=True)
class Summary:
    """The engine now, for a status line: `level` is "ready", "busy" (loading, or ready but
    slow) or "failed"; `title` a word or two; `text` the rest, in plain words."""

    level: str
    title: str
    text: str


@dataclass(frozen=True)
class EngineFigures:
    live: int  # conversations now
    slots: int
    tick_ms: float  # the last tick of the live conversations together; with none, the warm-up's tick of all slots


@dataclass(frozen=True)
class CustomVoice:
    key: str  # the name calls give it (`CallSettings.voice`)
    seconds: float
    clip: Path  # the clip as the model hears it (loudness-normalised), to play back


@dataclass(frozen=True)
class CallSettings:
    """A call's persona and decoding: checked when made (any JSON may have come from a client)."""

    voice: str  # a voice of the checkpoint by name, or a custom voice's key
    role: str = DEFAULT_TEXT_PROMPT  # the role prompt; "" for none
    sampling: SamplingParams = field(default_factory=SamplingParams)
    keep_persona: bool = True  # the system prompt stays in the model's window for the whole call

    def __post_init__(self) -> None:
        if not isinstance(self.role, str) or len(self.role) > MAX_ROLE_CHARS:
            shown = f"{len(self.role)} characters" if isinstance(self.role, str) else "not text"
            raise SettingsError(f"the role prompt is {shown}; the limit is {MAX_ROLE_CHARS} characters")


@dataclass(frozen=True)
class OfflineResult:
    user: np.ndarray  # [T] float32 the recording given
    agent: np.ndarray  # [T] float32 the model's side, exactly as long
    transcript: Transcript


class CallService(Protocol):
    """What a page (and `/api/chat`) asks of the server side. Every method but the loading ones
    may raise `UserError`s, whose message is for the person (`NotReady` before the model is)."""

    files: FileStore  # what calls and offline runs leave, kept for their page

    @property
    def status(self) -> Status: ...

    @property
    def context_s(self) -> float:
        """How much of a conversation the model holds (its window), in seconds."""
        ...

    @property
    def has_model(self) -> bool:
        """Whether the model runs in this process: voice previews and offline runs need it."""
        ...

    def start(self) -> None:
        """Load (or connect) in the background; `status` says how far it got."""
        ...

    def stop(self) -> None:
        """End every call ("the server is shutting down")."""
        ...

    def when_ready(self, callback: Callable[[], None]) -> None:
        """Call `callback` once ready (at once if it is)."""
        ...

    def wait_ready(self, timeout: float | None = None) -> Status: ...

    def summary(self) -> Summary: ...

    def figures(self) -> EngineFigures | None:
        """The engine now (None before it is known)."""
        ...

    def voice_names(self) -> list[str]: ...

    def add_custom_voice(self, path: str | Path, owner: str) -> CustomVoice:
        """A clip uploaded by the page session `owner`, checked and encoded: its voice, for that page alone."""
        ...

    def voice_preview(self, voice: str) -> Path:
        """A few seconds of the model talking in `voice` (a wav file)."""
        ...

    def run_offline(self, settings: CallSettings, user_pcm: np.ndarray,
                    progress: Callable[[int, int], None] | None = None,
                    waiting: Callable[[str], None] | None = None) -> OfflineResult:
        """The model's side of a recording (`progress(done, total)` in frames; `waiting(why)` while it waits its turn)."""
        ...

    def start_call(self, session: Session, settings: CallSettings) -> None:
        """Give a live session its persona and a slot; returns once the call has one (it goes live
        once its prompt has run), or raises why not (`Busy`, a bad voice...)."""
        ...


def offline_runs(slots: int) -> int:
    """Offline runs a service takes at once with `slots` slots (the others wait their turn)."""
    return max(1, slots // OFFLINE_SHARE)


def require_ready(status: Status) -> None:
    if not status.ready:
        raise NotReady(f"the model is not ready: {status.message}")


def read_voice_clip(path: str | Path) -> np.ndarray:
    """An uploaded voice clip, 24 kHz mono, once it is on the server, small enough, audio, and
    `CUSTOM_VOICE_SECONDS` long; else an `AudioError` that says which."""
    path = Path(path)
    if not path.is_file():  # a client named an upload that is not (or no longer) on the server
        raise AudioError(f"{path.name}: the clip is not on the server (any more): upload it again")
    if path.stat().st_size > MAX_UPLOAD_BYTES:
        raise AudioError(f"the file is larger than {MAX_UPLOAD_BYTES // 2**20} MB: upload a short clip of speech")
    low, high = CUSTOM_VOICE_SECONDS
    pcm = read_audio(path, max_seconds=high)
    seconds = pcm.size / SAMPLE_RATE
    if seconds > high:
        raise AudioError(f"the clip is {seconds:.1f} s long; use at most {high:g} s of speech")
    if seconds < low:
        raise AudioError(f"the clip is {seconds:.1f} s long; use at least {low:g} s of speech")
    return pcm
