"""What a call leaves behind: its recording and transcript, on disk and bounded.

Implements:
  * `CallRecording`: the stereo recording (user left, model right, 24 kHz 16-bit wav) written
    frame by frame as the call goes, so no audio is held in memory, capped in length, with the
    transcript (`runtime.transcript`) written next to it when the call ends;
  * `FileStore`: the folder where recordings and offline results live, each in a folder with an
    unguessable name; a recording is found only with its owner's token and its call id (never
    a client-chosen id alone); the oldest folders are deleted beyond a count and after an age.
    A small cache beside them keeps files made once and reused (voice previews).
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import threading
import time
import wave
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..model.config import FRAME_RATE, FRAME_S, FRAME_SIZE, SAMPLE_RATE
from .audio import float_to_int16, level_db
from .transcript import Transcript

WAV_NAME, TRANSCRIPT_NAME = "call.wav", "transcript.txt"


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
        self.transcript.add(self.seconds, text, level_db(user))
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
        self.transcript_path.write_text(self.transcript.render() or "(nobody said anything)\n")
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
                 max_recording_s: float = 900.0, keep_cached: int = 128, grace_s: float = 0.0) -> None:
        if root is None:  # a folder of its own, deleted with the store (at the latest when the process exits)
            root = Path(tempfile.mkdtemp(prefix="personaplex-files-"))
            weakref.finalize(self, shutil.rmtree, root, ignore_errors=True)
        self.root = root
        self.keep = keep
        self.keep_cached = keep_cached
        self.max_age_s = max_age_s
        self.max_recording_s = max_recording_s
        self.grace_s = grace_s  # younger folders are not deleted for the count: their files may be on their way
        self._entries: list[_Entry] = []
        self._lock = threading.Lock()

    def folder(self) -> Path:
        """A fresh folder (for an offline run's files)."""
        return self._new(lambda folder: None).folder

    def cached(self, name: str) -> Path:
        """A stable path for a file made once and reused (a voice's preview); the cache keeps
        the `keep_cached` newest files."""
        cache = self.root / "cache"
        cache.mkdir(exist_ok=True)
        files = sorted(cache.iterdir(), key=lambda f: f.stat().st_mtime)
        for old in files[: max(0, len(files) - self.keep_cached + 1)]:
            if old.name != name:
                old.unlink(missing_ok=True)
        return cache / name

    def recording(self, owner: str, call_id: str) -> CallRecording:
        """A new recording for the call `call_id` of the browser session whose token is `owner`."""
        entry = self._new(lambda folder: CallRecording(folder, self.max_recording_s), owner, call_id)
        assert entry.recording is not None
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
        """Delete every folder older than `max_age_s`, then the oldest ones beyond `keep` (none
        younger than `grace_s`); a recording still being written is never deleted."""
        now = time.monotonic() if now is None else now
        with self._lock:
            deletable = [e for e in self._entries if e.recording is None or e.recording.closed.is_set()]
            doomed = [e for e in deletable if now - e.created > self.max_age_s]
            surplus = len(self._entries) - len(doomed) - self.keep
            doomed += [e for e in deletable if e not in doomed and now - e.created >= self.grace_s][: max(0, surplus)]
            self._entries = [e for e in self._entries if e not in doomed]
        for entry in doomed:
            shutil.rmtree(entry.folder, ignore_errors=True)

    def _new(self, contents: Callable[[Path], CallRecording | None], owner: str | None = None,
             call_id: str | None = None) -> _Entry:
        """A folder with its contents made before the store counts it: a prune (from another
        thread) cannot take a folder that is still being set up."""
        folder = self.root / secrets.token_urlsafe(16)
        folder.mkdir(parents=True)
        entry = _Entry(folder, time.monotonic(), owner, call_id, contents(folder))
        with self._lock:
            self._entries.append(entry)
        self.prune()
        return entry
