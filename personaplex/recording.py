"""What a call leaves behind: its recording and transcript, on disk and bounded.

Implements:
  * `Transcript`: the agent's words as turns with start times (a new turn after a pause);
  * `CallRecording`: the stereo recording (user left, model right, 24 kHz 16-bit wav) written
    frame by frame as the call goes, so no audio is held in memory, capped in length, with the
    transcript written next to it when the call ends;
  * `FileStore`: the folder where recordings and offline results live, each in a folder with an
    unguessable name; a recording is found only with its owner's token and its call id (never
    a client-chosen id alone); the oldest folders are deleted beyond a count and after an age.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import threading
import time
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .audio import float_to_int16
from .config import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE

FRAME_S = 1 / FRAME_RATE
TURN_PAUSE_S = 1.5  # no new words for this long: the next words start a new turn
WAV_NAME, TRANSCRIPT_NAME = "call.wav", "transcript.txt"


def clock_text(seconds: float) -> str:
    """m:ss"""
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


@dataclass
class Turn:
    start_s: float
    text: str


class Transcript:
    """The agent's text pieces, grouped into turns."""

    def __init__(self, pause_s: float = TURN_PAUSE_S) -> None:
        self.pause_s = pause_s
        self.turns: list[Turn] = []
        self._last_s = -np.inf

    def add(self, time_s: float, piece: str) -> None:
        if not piece:
            return
        if not self.turns or time_s - self._last_s >= self.pause_s:
            self.turns.append(Turn(time_s, piece.lstrip()))
        else:
            self.turns[-1].text += piece
        self._last_s = time_s

    def render(self) -> str:
        return "".join(f"[{clock_text(t.start_s)}] {t.text.strip()}\n" for t in self.turns)


class CallRecording:
    """A call's stereo wav and transcript in `folder`. Only one thread writes at a time (the
    session hands frames out in order); `closed` is set once both files are complete."""

    def __init__(self, folder: Path, max_seconds: float) -> None:
        self.folder = folder
        self.max_frames = int(max_seconds * FRAME_RATE)
        self.frames = 0  # written so far
        self.model_frames = 0  # of them, frames where the model answered
        self.truncated = False
        self.transcript = Transcript()
        self.closed = threading.Event()
        self._wav = wave.open(str(folder / WAV_NAME), "wb")
        self._wav.setnchannels(2)
        self._wav.setsampwidth(2)
        self._wav.setframerate(SAMPLE_RATE)

    @property
    def seconds(self) -> float:
        return self.frames * FRAME_S

    @property
    def wav_path(self) -> Path:
        return self.folder / WAV_NAME

    @property
    def transcript_path(self) -> Path:
        return self.folder / TRANSCRIPT_NAME

    def add(self, user: np.ndarray, agent: np.ndarray | None, text: str) -> None:
        """One 80 ms frame: the user's audio, the model's (None: it was silent) and its words."""
        if self._full():
            return
        self.transcript.add(self.seconds, text)
        stereo = np.zeros((FRAME_SIZE, 2), dtype=np.float32)
        stereo[:, 0] = user
        if agent is not None:
            stereo[:, 1] = agent
            self.model_frames += 1
        self._wav.writeframes(float_to_int16(stereo).tobytes())
        self.frames += 1

    def add_silence(self, frames: int) -> None:
        """A stretch where the client sent nothing (the call went on; so does the recording)."""
        frames = max(0, min(frames, self.max_frames - self.frames))
        self._wav.writeframes(bytes(4 * FRAME_SIZE * frames))
        self.frames += frames

    def close(self) -> None:
        if self.closed.is_set():
            return
        self._wav.close()
        self.transcript_path.write_text(self.transcript.render() or "(the model said nothing)\n")
        self.closed.set()

    def _full(self) -> bool:
        if self.frames >= self.max_frames:
            self.truncated = True
        return self.truncated


@dataclass
class _Entry:
    folder: Path
    created: float
    owner: str | None = None
    call_id: str | None = None
    recording: CallRecording | None = None


class FileStore:
    """Folders for what calls and offline runs leave, deleted beyond `keep` or after `max_age_s`."""

    def __init__(self, root: Path | None = None, keep: int = 32, max_age_s: float = 3600.0,
                 max_recording_s: float = 900.0) -> None:
        self.root = root or Path(tempfile.mkdtemp(prefix="personaplex-files-"))
        self.keep = keep
        self.max_age_s = max_age_s
        self.max_recording_s = max_recording_s
        self._entries: list[_Entry] = []
        self._lock = threading.Lock()

    def folder(self) -> Path:
        """A fresh folder (for an offline run's files)."""
        return self._new().folder

    def recording(self, owner: str, call_id: str) -> CallRecording:
        """A new recording for the call `call_id` of the browser session whose token is `owner`."""
        entry = self._new()
        entry.owner, entry.call_id = owner, call_id
        entry.recording = CallRecording(entry.folder, self.max_recording_s)
        return entry.recording

    def find(self, owner: str | None, call_id: str | None) -> CallRecording | None:
        """The recording of that call, if `owner` made it."""
        if not owner or not call_id:
            return None
        with self._lock:
            for entry in reversed(self._entries):
                if entry.recording is not None and secrets.compare_digest(entry.owner or "", owner) and entry.call_id == call_id:
                    return entry.recording
        return None

    def prune(self, now: float | None = None) -> None:
        """Delete every folder older than `max_age_s`, then the oldest ones beyond `keep`; a
        recording still being written is never deleted."""
        now = time.monotonic() if now is None else now
        with self._lock:
            deletable = [e for e in self._entries if e.recording is None or e.recording.closed.is_set()]
            doomed = [e for e in deletable if now - e.created > self.max_age_s]
            surplus = len(self._entries) - len(doomed) - self.keep
            doomed += [e for e in deletable if e not in doomed][: max(0, surplus)]
            self._entries = [e for e in self._entries if e not in doomed]
        for entry in doomed:
            shutil.rmtree(entry.folder, ignore_errors=True)

    def _new(self) -> _Entry:
        folder = self.root / secrets.token_urlsafe(16)
        folder.mkdir(parents=True)
        entry = _Entry(folder, time.monotonic())
        with self._lock:
            self._entries.append(entry)
        self.prune()
        return entry
