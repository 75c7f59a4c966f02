"""Service: what the web app needs from the engine, with no UI code.

Implements:
  * `Service`: loads the checkpoint in a background thread (the page is up meanwhile) and
    reports each stage and every problem in plain words with the fix (`status`); then owns the
    `EngineWorker`, starts live calls in their `Session`s (`start_call`) and runs recordings
    through the engine (`run_offline`); it keeps the files calls leave (`files`);
  * voices: the checkpoint's voice table (names only, never client paths) and custom voices
    (`add_custom_voice`: validated, loudness-normalised, encoded once, keyed by the clip and its uploader);
  * `NotReady`, `OfflineResult`.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import SettingsError, UserError
from ..model.config import (
    DEFAULT_TEXT_PROMPT,
    FRAME_RATE,
    FRAME_S,
    FRAME_SIZE,
    PERSONAPLEX_7B,
    SAMPLE_RATE,
    ModelConfig,
    load_config,
)
from ..model.generate import PromptPlan
from ..model.loading import CheckpointError, Models, load_models, resolve_checkpoint
from ..model.persona import VoicePrompt
from ..model.sampling import SamplingParams
from ..model.text import caption_text, piece_text
from ..runtime.audio import AudioError, level_db, normalize_loudness, read_audio, write_wav
from ..runtime.audio import preload as preload_codecs
from ..runtime.capacity import SLOT_MEMORY_RESERVE, cpu_threads, lm_parameter_count, slot_bytes, suggest_slots
from ..runtime.engine import Engine
from ..runtime.framing import BEHIND_TICK_MS
from ..runtime.graphs import compile_enabled
from ..runtime.recording import FileStore
from ..runtime.session import OFFLINE, Session
from ..runtime.transcript import Transcript
from ..runtime.worker import EngineWorker

logger = logging.getLogger(__name__)

MAX_ROLE_CHARS = 1000  # as the official client
CUSTOM_VOICE_SECONDS = (5.0, 30.0)
PREVIEW_SECONDS = 4.0  # a voice's preview: the model's first words on this much silence
PREVIEW_SEED = 1
MAX_UPLOAD_BYTES = 50 * 1024 * 1024
CUSTOM_VOICE_PREFIX = "custom:"
MAX_PLANS = 64  # persona prompts kept ready (the presets, and recent custom roles)
MAX_CUSTOM_VOICES = 64  # encoded custom voices kept
MAX_TICK_MS = 70.0  # the default number of conversations keeps one tick of all of them under this
FILES_GRACE_S = 60.0  # a new folder of results is not deleted for the count before Gradio has copied it
OFFLINE_SHARE = 4  # offline runs at once: at most one in this many slots, live calls come first


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
class Settings:
    checkpoint: str | None = None
    hf_repo: str | None = None
    config: str | None = None
    device: str | None = None  # default: cuda if available
    max_sessions: int | None = None  # default: what fits the device's memory
    prefill: bool = True


class NotReady(UserError):
    """The model is not loaded (yet)."""


@dataclass(frozen=True)
class CustomVoice:
    key: str  # the name `voice()` knows it by
    seconds: float
    clip: Path  # the clip as the model hears it (loudness-normalised), to play back


@dataclass(frozen=True)
class EngineFigures:
    live: int  # conversations now
    slots: int
    tick_ms: float  # the last tick of the live conversations together; with none, the warm-up's tick of all slots


@dataclass(frozen=True)
class Summary:
    """The engine now, for a status line: `level` is "ready", "busy" (loading, or ready but
    slow) or "failed"; `title` a word or two; `text` the rest, in plain words."""

    level: str
    title: str
    text: str


@dataclass(frozen=True)
class OfflineResult:
    user: np.ndarray  # [T] float32 the recording given
    agent: np.ndarray  # [T] float32 the model's side, exactly as long
    transcript: Transcript


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.config: ModelConfig = PERSONAPLEX_7B
        self.models: Models | None = None
        self.engine: Engine | None = None
        self.worker: EngineWorker | None = None
        self._status = Status(State.STARTING, "starting")
        self._voices: dict[str, VoicePrompt] = {}
        self._custom: OrderedDict[str, VoicePrompt] = OrderedDict()
        self._plans: OrderedDict[tuple[str, str], PromptPlan] = OrderedDict()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._when_ready: list[Callable[[], None]] = []
        self._offline = threading.BoundedSemaphore(1)  # sized once the slots are known (`offline_runs`)
        self._secret = secrets.token_bytes(32)  # keys custom voices: a clip's key is its uploader's alone
        self.files = FileStore(grace_s=FILES_GRACE_S)

    # --- loading ------------------------------------------------------------------------
    def start(self) -> None:
        """Load in the background; `status` tells how far it got."""
        self._thread = threading.Thread(target=self._load, name="personaplex-loader", daemon=True)
        self._thread.start()

    def when_ready(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the model is ready (on the loader thread; at once if it is)."""
        with self._lock:
            if self.status.state is not State.READY:
                self._when_ready.append(callback)
                return
        callback()

    def stop(self) -> None:
        """End every call and offline run ("the server is shutting down") and stop the engine thread."""
        if self.worker is not None:
            self.worker.stop()

    def wait_ready(self, timeout: float | None = None) -> Status:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.status

    @property
    def status(self) -> Status:
        return self._status

    def _set(self, state: State, message: str, frame_ms: float | None = None) -> None:
        self._status = Status(state, message, frame_ms)
        logger.info("%s: %s", state.value, message)

    def _load(self) -> None:
        s = self.settings
        try:
            if s.device == "cuda" and not torch.cuda.is_available():
                raise CheckpointError("--device cuda was asked for, but PyTorch sees no CUDA GPU on this machine")
            self.config = load_config(s.config) if s.config else PERSONAPLEX_7B
            dtype = self._check_room()
            source = s.checkpoint or s.hf_repo or "nvidia/personaplex-7b-v1"
            if s.checkpoint:
                self._set(State.LOADING, f"reading the checkpoint in {source}")
            else:
                self._set(State.DOWNLOADING, f"fetching the weights of {source} (about 17 GB the first time)")
            files = resolve_checkpoint(s.checkpoint, s.hf_repo)
            preload_codecs()  # (here, not at the first upload)
            self._set(State.LOADING, f"loading the model onto {self.device}")
            if self.device.type == "cpu":
                torch.set_num_threads(cpu_threads())
            self.models = load_models(files, self.config, self.device, dtype)
            slots = s.max_sessions or suggest_slots(self.config, self.models.lm.dtype, self.device)
            if compile_enabled(self.device):
                self._set(State.LOADING, f"compiling the engine's step for {slots} conversation slots (minutes on a "
                          "first start; a kept Inductor cache makes it quicker)")
            self.engine = Engine(self.models, num_slots=slots, pinning=True)
            self.worker = EngineWorker(self.engine)
            self._set(State.WARMING_UP, "warming up")
            frame_ms = self._warm_up()
            if not s.max_sessions:  # as many as fit, and as many as one tick serves in time
                slots, frame_ms = self._fit_sessions(frame_ms)
            self._offline = threading.BoundedSemaphore(offline_runs(slots))
            with self._lock:
                self._set(State.READY, self._ready_message(slots, frame_ms), frame_ms)
                callbacks, self._when_ready = self._when_ready, []
            for callback in callbacks:
                try:
                    callback()
                except Exception:  # the model is ready all the same
                    logger.exception("a callback for the ready model failed")
        except CheckpointError as exc:  # missing files, gated repo, no GPU: said in the status line
            self._set(State.FAILED, str(exc))
        except Exception as exc:  # the loader thread's boundary: every failure goes to the status line
            logger.exception("loading failed")
            self._set(State.FAILED, f"{type(exc).__name__}: {exc}")

    def _check_room(self) -> torch.dtype | None:
        """Refuse early, before a 17 GB download, what cannot fit; the LM dtype to load with."""
        weights = 2 * sum(lm_parameter_count(self.config).values())  # bf16 bytes
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            need = weights + 2 * slot_bytes(self.config, torch.bfloat16) + SLOT_MEMORY_RESERVE // 2  # a slot, and a prefill's
            if free < need:
                raise CheckpointError(
                    f"this GPU has {free / 2**30:.1f} GB free of {total / 2**30:.1f} GB; the model needs about "
                    f"{need / 2**30:.0f} GB for its weights and one conversation"
                )
            return None
        if self.settings.device != "cpu" and weights > 2 * 1024**3:
            raise CheckpointError(
                "no CUDA GPU found: the 7B model needs one with 24 GB or more (on a CPU it runs far slower than "
                "real time). Start with --device cpu to try anyway, or try the page with the tiny test model: "
                "--checkpoint tests/fixtures/tiny/checkpoint --config tests/fixtures/tiny/checkpoint/tiny_config.json"
            )
        return torch.bfloat16 if weights > 2 * 1024**3 else None  # a 7B in float32 would not fit in RAM

    def _warm_up(self, bucket: int | None = None) -> float:
        """One batched step over `bucket` slots (all by default), every attention window full,
        twice; the second one's time."""
        assert self.worker is not None and self.engine is not None
        engine = self.engine
        bucket = bucket or engine.num_slots

        def tick() -> float:
            with engine.full_windows():  # what a tick costs once the calls are four minutes old
                start = time.perf_counter()
                out = engine.step(torch.zeros(bucket, FRAME_SIZE), bucket)
                out.pcm.cpu()
                return (time.perf_counter() - start) * 1000

        self.worker.call(tick).result()
        return self.worker.call(tick).result()

    def _fit_sessions(self, full_ms: float) -> tuple[int, float]:
        """The largest bucket whose tick stays under `MAX_TICK_MS` (the rest of the 80 ms frame is
        the margin that keeps calls in real time); the worker takes no more calls than that."""
        assert self.worker is not None and self.engine is not None
        usable, tick_ms = self.engine.num_slots, full_ms
        for bucket in sorted(self.engine.buckets(), reverse=True)[1:]:
            if tick_ms <= MAX_TICK_MS:
                break
            usable, tick_ms = bucket, self._warm_up(bucket)
        self.worker.max_live = usable
        return usable, tick_ms

    def _ready_message(self, slots: int, frame_ms: float) -> str:
        what = f"ready on {self.device} with {slots} conversation slot{'s' * (slots > 1)}; one frame of all slots takes {frame_ms:.0f} ms"
        assert self.engine is not None
        for shortfall in self.engine.shortfalls:  # loud: the engine works, but slower than it should
            what += f" {shortfall}"
        if frame_ms > FRAME_S * 1000:
            what += (
                f". That is {frame_ms / (FRAME_S * 1000):.1f}x slower than real time: live audio will stutter. "
                "Use a GPU for live conversations, or the offline tab here"
            )
        return what

    # --- voices -------------------------------------------------------------------------
    def voice_names(self) -> list[str]:
        return list(self.models.voices) if self.models else []

    def _require_ready(self) -> tuple[Engine, EngineWorker]:
        if not self._status.ready or self.engine is None or self.worker is None:
            raise NotReady(f"the model is not ready: {self._status.message}")
        return self.engine, self.worker

    def voice(self, name: str) -> VoicePrompt:
        """A checkpoint voice by name, or a custom voice by its key; cached. A voice stored as
        audio is encoded by Mimi, which only the engine thread may run (between two ticks)."""
        engine, worker = self._require_ready()
        if name.startswith(CUSTOM_VOICE_PREFIX):
            with self._lock:
                voice = self._custom.get(name)
            if voice is None:
                raise AudioError("the uploaded voice is no longer available: upload it again")
            return voice
        with self._lock:
            cached = self._voices.get(name)
        if cached is None:
            path = self.models.voices.get(name) if self.models else None
            if path is not None and path.suffix.lower() != ".pt":  # needs Mimi: the engine thread's
                cached = worker.call(lambda: engine.voice(name)).result()
            else:  # a .pt file, or an unknown name (engine.voice says which names exist)
                cached = engine.voice(name)
            with self._lock:
                self._voices[name] = cached
        return cached

    def add_custom_voice(self, path: str | Path, owner: str) -> CustomVoice:
        """Validate, normalise and encode an uploaded voice clip for `owner` (a page session):
        its key is made from the clip and the owner with a secret of this server, so another page
        can neither use it nor find out, by uploading the same clip, that it was uploaded."""
        self._require_ready()
        path = Path(path)
        if not path.is_file():  # a client named an upload that is not (or no longer) on the server
            raise AudioError(f"{path.name}: the clip is not on the server (any more): upload it again")
        if path.stat().st_size > MAX_UPLOAD_BYTES:
            raise AudioError(f"the file is larger than {MAX_UPLOAD_BYTES // 2**20} MB: upload a short clip of speech")
        data = path.read_bytes()
        mac = hmac.new(self._secret, owner.encode() + b"\0" + hashlib.sha256(data).digest(), hashlib.sha256)
        return self._encode_custom_voice(path, CUSTOM_VOICE_PREFIX + mac.hexdigest()[:32])

    def add_custom_voice_bytes(self, data: bytes, key: str) -> CustomVoice:
        """A clip as bytes, under a key made elsewhere (a cluster's voice store, which keys it
        for its page: `personaplex.cluster`)."""
        self._require_ready()
        if len(data) > MAX_UPLOAD_BYTES:
            raise AudioError(f"the file is larger than {MAX_UPLOAD_BYTES // 2**20} MB: upload a short clip of speech")
        if not key.startswith(CUSTOM_VOICE_PREFIX):
            raise SettingsError("a custom voice's key starts with " + CUSTOM_VOICE_PREFIX)
        upload = self.files.cached("upload-" + secrets.token_hex(8))
        try:
            upload.write_bytes(data)
            return self._encode_custom_voice(upload, key)
        finally:
            upload.unlink(missing_ok=True)

    def has_voice(self, name: str) -> bool:
        """A custom voice this engine has encoded (and still keeps), or a checkpoint voice."""
        with self._lock:
            return name in self._custom or name in self.voice_names()

    def _encode_custom_voice(self, path: Path, key: str) -> CustomVoice:
        engine, worker = self._require_ready()
        low, high = CUSTOM_VOICE_SECONDS
        pcm = read_audio(path, max_seconds=high)
        seconds = pcm.size / SAMPLE_RATE
        if seconds > high:
            raise AudioError(f"the clip is {seconds:.1f} s long; use at most {high:g} s of speech")
        if seconds < low:
            raise AudioError(f"the clip is {seconds:.1f} s long; use at least {low:g} s of speech")
        clip = self.files.cached(key.removeprefix(CUSTOM_VOICE_PREFIX) + ".wav")  # what the model hears, to play back
        with self._lock:
            if key in self._custom and clip.exists():  # the same clip again: nothing to redo
                return CustomVoice(key, seconds, clip)
        normalised = normalize_loudness(pcm)
        write_wav(clip, normalised)
        voice = worker.run(engine.voice_pieces(normalised)).result()  # between ticks, a few frames at a time
        with self._lock:
            _keep(self._custom, key, voice, MAX_CUSTOM_VOICES)
        return CustomVoice(key, seconds, clip)

    def voice_preview(self, voice: str) -> Path:
        """The model's first words in `voice` when nobody speaks (made once, then cached): what a
        voice sounds like, made by the model itself from the voice prompt."""
        self.voice(voice)  # an unknown voice fails here, before any work
        path = self.files.cached("preview-" + hashlib.sha256(voice.encode()).hexdigest()[:24] + ".wav")
        if not path.exists():
            silence = np.zeros(int(PREVIEW_SECONDS * SAMPLE_RATE), dtype=np.float32)
            # Not behind the offline runs (a preview takes a slot for a moment, one at a time, then it is cached).
            result = self._run_offline(voice, DEFAULT_TEXT_PROMPT, SamplingParams(seed=PREVIEW_SEED), silence, None)
            partial = path.with_suffix(".part")
            write_wav(partial, result.agent)
            partial.replace(path)
        return path

    @property
    def context_s(self) -> float:
        """How much of a conversation the model holds (its window), in seconds."""
        return self.config.lm.context / FRAME_RATE

    @property
    def shortfalls(self) -> list[str]:
        """What the engine runs slower than it should, and why (`Engine.shortfalls`)."""
        return self.engine.shortfalls if self.engine is not None else []

    def figures(self) -> EngineFigures | None:
        """The engine now (None before it is loaded)."""
        engine, worker = self.engine, self.worker
        if engine is None or worker is None:
            return None
        live = worker.live_sessions
        tick_ms = worker.last_tick_ms if live else (self.status.frame_ms or 0.0)
        return EngineFigures(live, min(engine.num_slots, worker.max_live), tick_ms)

    def summary(self) -> Summary:
        """The engine now: loading (its stage), failed (what to fix), or ready with its calls and
        how long a tick of all of them takes, and how near real time that is."""
        s, figures = self.status, self.figures()
        if s.state is not State.READY or figures is None:
            level = {State.FAILED: "failed"}.get(s.state, "busy")
            return Summary(level, s.state.value.capitalize(), s.message)
        where = self.device.type
        if figures.live:
            text = (f"on {where}: {figures.live} of {figures.slots} conversations in progress; "
                    f"an 80 ms frame of all of them takes {figures.tick_ms:.0f} ms now")
        else:
            text = (f"on {where} for {figures.slots} conversations at once; an 80 ms frame of "
                    f"all of them took {figures.tick_ms:.0f} ms at start-up")
        level = "ready"
        for shortfall in self.shortfalls:  # said, not only logged
            text += f"; running {shortfall}, slower than it should"
            level = "busy"
        if figures.tick_ms > FRAME_S * 1000:
            text += f", {figures.tick_ms / (FRAME_S * 1000):.1f}x slower than real time: live audio will stutter (use a GPU, or the offline tab)"
            level = "failed"
        elif figures.tick_ms > BEHIND_TICK_MS:
            text += f", near the {FRAME_S * 1000:g} ms a frame lasts"
            level = "busy"
        return Summary(level, "Ready", text)

    # --- conversations ------------------------------------------------------------------
    def plan(self, voice: str, role: str) -> PromptPlan:
        """The persona's prompt, ready for the engine: made once per voice and role (host work
        that would otherwise hold the interpreter while the engine thread ticks)."""
        engine, _ = self._require_ready()
        if len(role) > MAX_ROLE_CHARS:
            raise SettingsError(f"the role prompt is {len(role)} characters; the limit is {MAX_ROLE_CHARS}")
        key = (voice, role)
        with self._lock:
            plan = self._plans.get(key)
        if plan is None:
            plan = engine.plan(engine.prompt(self.voice(voice), role))
        with self._lock:
            _keep(self._plans, key, plan, MAX_PLANS)
        return plan

    def describe(self, text_id: int) -> str:
        """The words of one text id, as people read them."""
        return caption_text(text_id, self.models.tokenizer) if self.models is not None else ""

    def text_piece(self, text_id: int) -> str:
        """One text id as the official server sends it: the piece with "▁" as a space, '' for padding."""
        return piece_text(text_id, self.models.tokenizer) if self.models is not None else ""

    def start_call(self, session: Session, voice: str, role: str, sampling: SamplingParams,
                   keep_persona: bool = True) -> None:
        """Give a live session its persona and a slot; raises `UserError`s (busy, bad voice...).
        With `keep_persona` the system prompt stays in the model's window for the whole call."""
        _, worker = self._require_ready()
        session.describe = self.describe
        worker.open(session.port, self.plan(voice, role), sampling, keep_persona)

    def run_offline(
        self,
        voice: str,
        role: str,
        sampling: SamplingParams,
        user_pcm: np.ndarray,
        progress: Callable[[int, int], None] | None = None,
        waiting: Callable[[str], None] | None = None,
    ) -> OfflineResult:
        """The whole recording through the engine, at its pace, in a slot of its own (the
        persona kept past the model's context, as in a call by default). Only a share of the
        slots runs recordings (`offline_runs`): the others are kept for live calls, and a run
        beyond that share waits, saying so through `waiting`."""
        self._require_ready()
        if user_pcm.size == 0:
            raise AudioError("the recording is empty")
        if not self._offline.acquire(blocking=False):
            if waiting is not None:
                waiting("waiting for the runs ahead: live calls keep most of the engine's slots")
            self._offline.acquire()
        try:
            return self._run_offline(voice, role, sampling, user_pcm, progress)
        finally:
            self._offline.release()

    def _run_offline(self, voice: str, role: str, sampling: SamplingParams, user_pcm: np.ndarray,
                     progress: Callable[[int, int], None] | None) -> OfflineResult:
        _, worker = self._require_ready()
        session = Session(OFFLINE)
        session.describe = self.describe
        worker.open(session.port, self.plan(voice, role), sampling, keep_persona=True)
        session.push(user_pcm, final=True)
        total = session.stats.frames_in
        agent: list[np.ndarray] = []
        transcript = Transcript()
        try:
            while len(agent) < total:
                out = session.next(0.5)
                if out is None:
                    if session.ending is not None and session.ending.reason == "error":
                        raise RuntimeError(session.ending.message)
                    if session.ending is not None:  # the server is shutting down: said, not a fault
                        raise UserError(f"the run was stopped: {session.ending.message}")
                    continue
                agent.append(out.pcm)
                transcript.add(out.index * FRAME_S, out.text, level_db(out.user))
                if progress is not None:
                    progress(len(agent), total)
        finally:
            session.end("stopped", "the recording is done")
        return OfflineResult(user=user_pcm, agent=np.concatenate(agent)[: user_pcm.size], transcript=transcript)


def on_the_tiny_model(settings: Settings, tiny_checkpoint: Path) -> Settings | None:
    """With no model asked for and no CUDA GPU, the tiny random model in the release format at
    `tiny_checkpoint` on the CPU (a working page that says what it runs, instead of a failure);
    None when a model was asked for, there is a GPU, or there is no tiny model."""
    asked = settings.checkpoint or settings.hf_repo or settings.config or settings.device
    if asked or torch.cuda.is_available() or not (tiny_checkpoint / "model.safetensors").is_file():
        return None
    return Settings(str(tiny_checkpoint), None, str(tiny_checkpoint / "tiny_config.json"), "cpu", settings.max_sessions)


def offline_runs(slots: int) -> int:
    """Offline runs the engine takes at once with `slots` slots."""
    return max(1, slots // OFFLINE_SHARE)


def _keep(cache: OrderedDict, key: object, value: object, limit: int) -> None:
    """Put `value` in the least-recently-used `cache`, which keeps the `limit` newest."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > limit:
        cache.popitem(last=False)
