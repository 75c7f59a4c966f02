"""The voices a service offers: the checkpoint's, by name, and custom ones, by their page.

Implements `Voices`: the checkpoint's voice table (names only, never a client's path), each
voice prompt made once and kept; and custom voices, a clip uploaded by a page (checked, normalised
to -24 LUFS, encoded once between the engine's ticks, `MAX_CUSTOM_VOICES` kept), whose key is
made from the clip and its page with a secret of this server: another page can neither use it
nor find out, by uploading the same clip, that it was uploaded.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..model.persona import VoicePrompt
from ..runtime.audio import AudioError, normalize_loudness, write_wav
from ..runtime.engine import Engine
from ..runtime.recording import FileStore
from ..runtime.worker import EngineWorker
from .contract import CUSTOM_VOICE_PREFIX, MAX_UPLOAD_BYTES, SAMPLE_RATE, CustomVoice, SettingsError, read_voice_clip

MAX_CUSTOM_VOICES = 64  # encoded custom voices kept


class Voices:
    """Thread-safe; its engine and worker are given once the model is loaded (`attach`)."""

    def __init__(self, files: FileStore) -> None:
        self.files = files
        self._engine: Engine | None = None
        self._worker: EngineWorker | None = None
        self._names: list[str] = []
        self._prompts: dict[str, VoicePrompt] = {}
        self._custom: OrderedDict[str, VoicePrompt] = OrderedDict()
        self._lock = threading.Lock()
        self._secret = secrets.token_bytes(32)  # keys custom voices: a clip's key is its uploader's alone

    def attach(self, engine: Engine, worker: EngineWorker) -> None:
        self._engine, self._worker = engine, worker
        self._names = list(engine.models.voices)

    def names(self) -> list[str]:
        """The checkpoint's voices (none before it is loaded)."""
        return list(self._names)

    def has(self, name: str) -> bool:
        """A custom voice this server has encoded (and still keeps), or a checkpoint voice."""
        with self._lock:
            return name in self._custom or name in self._names

    def prompt(self, name: str) -> VoicePrompt:
        """A checkpoint voice by name, or a custom voice by its key. A voice stored as audio is
        encoded by Mimi, which only the engine thread may run (between two ticks)."""
        engine, worker = self._attached()
        if name.startswith(CUSTOM_VOICE_PREFIX):
            with self._lock:
                voice = self._custom.get(name)
            if voice is None:
                raise AudioError("the uploaded voice is no longer available: upload it again")
            return voice
        with self._lock:
            cached = self._prompts.get(name)
        if cached is None:
            path = engine.models.voices.get(name)
            if path is not None and path.suffix.lower() != ".pt":  # needs Mimi: the engine thread's
                cached = worker.call(lambda: engine.voice(name)).result()
            else:  # a .pt file, or an unknown name (engine.voice says which names exist)
                cached = engine.voice(name)
            with self._lock:
                self._prompts[name] = cached
        return cached

    def add_custom(self, path: str | Path, owner: str) -> CustomVoice:
        """An uploaded clip becomes `owner`'s custom voice (`owner`: a page session)."""
        pcm = read_voice_clip(path)
        digest = hashlib.sha256(Path(path).read_bytes()).digest()
        mac = hmac.new(self._secret, owner.encode() + b"\0" + digest, hashlib.sha256)
        return self._encode(pcm, CUSTOM_VOICE_PREFIX + mac.hexdigest()[:32])

    def add_custom_bytes(self, data: bytes, key: str) -> CustomVoice:
        """A clip as bytes, under a key made elsewhere (a cluster's voice store, which keys it for
        its page: `serve.cluster`)."""
        if len(data) > MAX_UPLOAD_BYTES:
            raise AudioError(f"the file is larger than {MAX_UPLOAD_BYTES // 2**20} MB: upload a short clip of speech")
        if not key.startswith(CUSTOM_VOICE_PREFIX):
            raise SettingsError("a custom voice's key starts with " + CUSTOM_VOICE_PREFIX)
        upload = self.files.cached("upload-" + secrets.token_hex(8))
        try:
            upload.write_bytes(data)
            return self._encode(read_voice_clip(upload), key)
        finally:
            upload.unlink(missing_ok=True)

    def _encode(self, pcm: np.ndarray, key: str) -> CustomVoice:
        """pcm [T] at 24 kHz, checked (`read_voice_clip`) -> the custom voice `key`."""
        engine, worker = self._attached()
        seconds = pcm.size / SAMPLE_RATE
        clip = self.files.cached(key.removeprefix(CUSTOM_VOICE_PREFIX) + ".wav")  # what the model hears, to play back
        with self._lock:
            if key in self._custom and clip.exists():  # the same clip again: nothing to redo
                return CustomVoice(key, seconds, clip)
        normalised = normalize_loudness(pcm)
        write_wav(clip, normalised)
        voice = worker.run(engine.voice_pieces(normalised)).result()  # between ticks, a few frames at a time
        with self._lock:
            self._custom[key] = voice
            self._custom.move_to_end(key)
            while len(self._custom) > MAX_CUSTOM_VOICES:
                self._custom.popitem(last=False)
        return CustomVoice(key, seconds, clip)

    def _attached(self) -> tuple[Engine, EngineWorker]:
        assert self._engine is not None and self._worker is not None, "the service checks readiness first"
        return self._engine, self._worker
