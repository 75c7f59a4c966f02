"""Service: the `CallService` contract on an engine in this process, with no UI code.

Implements:
  * `Service`: loads the checkpoint in a background thread (the page is up meanwhile) and
    reports each stage and every problem in plain words with the fix (`status`, `summary`); then
    owns the engine and its thread (`EngineWorker`), starts live calls in their sessions
    (`start_call`), runs recordings through the engine (`run_offline`, `voice_preview`), offers
    the checkpoint's and the pages' own voices (`serve.voices`) and keeps the files calls leave
    (`files`);
  * `Settings`: the model to load; `on_the_tiny_model`: the page's model when none was named and
    there is no GPU.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..model.config import FRAME_RATE, FRAME_S, PERSONAPLEX_7B, SAMPLE_RATE, ModelConfig, SamplingParams, load_config
from ..model.generate import PreparedPrompt
from ..model.loading import DEFAULT_REPO, CheckpointError, Models, load_models, resolve_checkpoint
from ..model.text import Words
from ..runtime.audio import AudioError, level_db, write_wav
from ..runtime.audio import preload as preload_codecs
from ..runtime.capacity import check_formats, check_room, choose_weights, cpu_threads, fit_slots, suggest_slots, tick_ms
from ..runtime.compiled import compile_enabled
from ..runtime.engine import Engine
from ..runtime.transcript import Transcript
from ..runtime.worker import EngineWorker
from .contract import (
    BEHIND_TICK_MS,
    FILES_GRACE_S,
    OFFLINE,
    CallSettings,
    CustomVoice,
    EngineFigures,
    FileStore,
    OfflineResult,
    Session,
    State,
    Status,
    Summary,
    UserError,
    offline_runs,
    require_ready,
)
from .voices import Voices

logger = logging.getLogger(__name__)

PREVIEW_SECONDS = 4.0  # a voice's preview: the model's first words on this much silence
PREVIEW_SEED = 1
MAX_PROMPTS = 64  # persona prompts kept ready (the presets, and recent custom roles)


@dataclass(frozen=True)
class Settings:
    checkpoint: str | None = None
    hf_repo: str | None = None
    config: str | None = None
    device: str | None = None  # default: cuda if available
    max_sessions: int | None = None  # default: what fits the device's memory
    weights: str = "auto"  # the LM's weights: auto, bf16, int8 or fp8 (`formats`)
    kv_cache: str = "bf16"  # the LM's KV cache: bf16 or fp8 (`kv_cache`)


class Service:
    """See the module docstring; thread-safe."""

    has_model = True

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.config: ModelConfig = PERSONAPLEX_7B
        self.models: Models | None = None
        self.engine: Engine | None = None
        self.worker: EngineWorker | None = None
        self.weights = settings.weights  # as loaded, once "auto" has chosen
        self._chosen = ""  # why "auto" chose what it did
        self.files = FileStore(grace_s=FILES_GRACE_S)
        self.voices = Voices(self.files)
        self._words: Words | None = None
        self._status = Status(State.STARTING, "starting")
        self._prompts: OrderedDict[tuple[str, str], PreparedPrompt] = OrderedDict()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._when_ready: list[Callable[[], None]] = []
        self._offline = threading.BoundedSemaphore(1)  # sized once the slots are known (`offline_runs`)

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
        try:
            slots, frame_ms = self._load_engine()
            self._offline = threading.BoundedSemaphore(offline_runs(slots))
            with self._lock:
                self._set(State.READY, self._ready_message(slots, frame_ms), frame_ms)
                callbacks, self._when_ready = self._when_ready, []
            for callback in callbacks:
                try:
                    callback()
                except Exception:  # the model is ready all the same
                    logger.exception("a callback for the ready model failed")
        except UserError as exc:  # missing files, gated repo, no GPU, a format it cannot run: said in the status line
            self._set(State.FAILED, str(exc))
        except Exception as exc:  # the loader thread's boundary: every failure goes to the status line
            logger.exception("loading failed")
            self._set(State.FAILED, f"{type(exc).__name__}: {exc}")

    def _load_engine(self) -> tuple[int, float]:
        """Files, weights, the engine and its thread, the warm-up; the slots taken and their tick."""
        s = self.settings
        if s.device == "cuda" and not torch.cuda.is_available():
            raise CheckpointError("--device cuda was asked for, but PyTorch sees no CUDA GPU on this machine")
        check_formats(self.device, s.weights, s.kv_cache)
        self.config = load_config(s.config) if s.config else PERSONAPLEX_7B
        self.weights, self._chosen = choose_weights(self.config, self.device, s.kv_cache, s.weights)
        dtype = check_room(self.config, self.device, cpu_asked=s.device == "cpu", weights=self.weights, kv_cache=s.kv_cache)
        if s.checkpoint:
            self._set(State.LOADING, f"reading the checkpoint in {s.checkpoint}")
        else:
            self._set(State.DOWNLOADING, f"fetching the weights of {s.hf_repo or DEFAULT_REPO} (about 17 GB the first time)")
        files = resolve_checkpoint(s.checkpoint, s.hf_repo)
        preload_codecs()  # (here, not at the first upload)
        self._set(State.LOADING, f"loading the model onto {self.device}")
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads())  # the process's one model: its share of the cores
        self.models = load_models(files, self.config, self.device, dtype, weights=self.weights)
        slots = s.max_sessions or suggest_slots(self.config, s.kv_cache, self.models.lm.dtype, self.device)
        if compile_enabled(self.device):
            self._set(State.LOADING, f"compiling the engine's step for {slots} conversation slots (minutes on a "
                      "first start; a kept Inductor cache makes it quicker)")
        self.engine = Engine(self.models, num_slots=slots, pinning=True, kv_cache=s.kv_cache)
        self.worker = EngineWorker(self.engine)
        self.voices.attach(self.engine, self.worker)
        self._words = Words(self.models.tokenizer)
        self._set(State.WARMING_UP, "warming up")
        frame_ms = tick_ms(self.engine, self.worker)
        if not s.max_sessions:  # as many as fit, and as many as one tick serves in time
            slots, frame_ms = fit_slots(self.engine, self.worker, frame_ms)
        return slots, frame_ms

    def _ready_message(self, slots: int, frame_ms: float) -> str:
        what = (f"ready on {self.device} with {slots} conversation slot{'s' * (slots > 1)}; one frame of all slots takes "
                f"{frame_ms:.0f} ms; {self.formats}")
        if self._chosen:
            what += f" (--weights auto: {self._chosen})"
        assert self.engine is not None
        for shortfall in self.engine.shortfalls:  # loud: the engine works, but slower than it should
            what += f" {shortfall}"
        if frame_ms / 1000 > FRAME_S:
            what += (
                f". That is {frame_ms / 1000 / FRAME_S:.1f}x slower than real time: live audio will stutter. "
                "Use a GPU for live conversations, or the offline tab here"
            )
        return what

    def _ready(self) -> tuple[Engine, EngineWorker, Words]:
        require_ready(self._status)
        assert self.engine is not None and self.worker is not None and self._words is not None
        return self.engine, self.worker, self._words

    # --- what the page shows --------------------------------------------------------------
    @property
    def formats(self) -> str:
        """The LM's weights and KV cache in words ("int8 weights, fp8 KV cache"); "bf16" is the
        model's own dtype, said as it is (float32 on a CPU)."""
        own = str(self.models.lm.dtype if self.models is not None else "").removeprefix("torch.").replace("bfloat16", "bf16")
        weights = own if self.weights == "bf16" else self.weights
        cache = own if self.settings.kv_cache == "bf16" else self.settings.kv_cache
        return f"{weights} weights and KV cache" if weights == cache else f"{weights} weights, {cache} KV cache"

    @property
    def context_s(self) -> float:
        """How much of a conversation the model holds (its window), in seconds."""
        return self.config.lm.context / FRAME_RATE

    def figures(self) -> EngineFigures | None:
        """The engine now (None before it is loaded)."""
        engine, worker = self.engine, self.worker
        if engine is None or worker is None:
            return None
        live = worker.live_sessions
        tick = worker.last_tick_ms if live else (self.status.frame_ms or 0.0)
        return EngineFigures(live, min(engine.num_slots, worker.max_live), tick)

    def summary(self) -> Summary:
        """The engine now: loading (its stage), failed (what to fix), or ready with its calls and
        how long a tick of all of them takes, and how near real time that is."""
        s, figures = self.status, self.figures()
        if s.state is not State.READY or figures is None:
            level = {State.FAILED: "failed"}.get(s.state, "busy")
            return Summary(level, s.state.value.capitalize(), s.message)
        where = f"{self.device.type} ({self.formats})"
        if figures.live:
            text = (f"on {where}: {figures.live} of {figures.slots} conversations in progress; "
                    f"an 80 ms frame of all of them takes {figures.tick_ms:.0f} ms now")
        else:
            text = (f"on {where} for {figures.slots} conversations at once; an 80 ms frame of "
                    f"all of them took {figures.tick_ms:.0f} ms at start-up")
        level = "ready"
        for shortfall in self.engine.shortfalls if self.engine is not None else []:  # said, not only logged
            text += f"; running {shortfall}, slower than it should"
            level = "busy"
        if figures.tick_ms / 1000 > FRAME_S:
            text += f", {figures.tick_ms / 1000 / FRAME_S:.1f}x slower than real time: live audio will stutter (use a GPU, or the offline tab)"
            level = "failed"
        elif figures.tick_ms > BEHIND_TICK_MS:
            text += f", near the {FRAME_S * 1000:g} ms a frame lasts"
            level = "busy"
        return Summary(level, "Ready", text)

    # --- voices -------------------------------------------------------------------------
    def voice_names(self) -> list[str]:
        return self.voices.names()

    def add_custom_voice(self, path: str | Path, owner: str) -> CustomVoice:
        """Validate, normalise and encode an uploaded voice clip for `owner` (a page session)."""
        self._ready()
        return self.voices.add_custom(path, owner)

    def add_custom_voice_bytes(self, data: bytes, key: str) -> CustomVoice:
        """A clip as bytes under a key made elsewhere (a cluster's voice store: `serve.cluster`)."""
        self._ready()
        return self.voices.add_custom_bytes(data, key)

    def voice_preview(self, voice: str) -> Path:
        """The model's first words in `voice` when nobody speaks (made once, then cached): what a
        voice sounds like, made by the model itself from the voice prompt."""
        self._ready()
        self.voices.prompt(voice)  # an unknown voice fails here, before any work
        path = self.files.cached("preview-" + hashlib.sha256(voice.encode()).hexdigest()[:24] + ".wav")
        if not path.exists():
            silence = np.zeros(int(PREVIEW_SECONDS * SAMPLE_RATE), dtype=np.float32)
            # Not behind the offline runs (a preview takes a slot for a moment, one at a time, then it is cached).
            result = self._run_offline(CallSettings(voice, sampling=SamplingParams(seed=PREVIEW_SEED)), silence, None)
            partial = path.with_suffix(".part")
            write_wav(partial, result.agent)
            partial.replace(path)
        return path

    # --- conversations ------------------------------------------------------------------
    def _prepared(self, voice: str, role: str) -> PreparedPrompt:
        """The persona's prompt, ready for the engine: made once per voice and role (host work
        that would otherwise hold the interpreter while the engine thread ticks)."""
        engine, _, _ = self._ready()
        key = (voice, role)
        with self._lock:
            prepared = self._prompts.get(key)
        if prepared is None:
            prepared = engine.prepare(engine.prompt(self.voices.prompt(voice), role))
        with self._lock:
            self._prompts[key] = prepared
            self._prompts.move_to_end(key)
            while len(self._prompts) > MAX_PROMPTS:
                self._prompts.popitem(last=False)
        return prepared

    def start_call(self, session: Session, settings: CallSettings) -> None:
        """Give a live session its persona and a slot; raises `UserError`s (busy, bad voice...)."""
        _, worker, words = self._ready()
        session.words = words
        worker.open(session.port, self._prepared(settings.voice, settings.role), settings.sampling, settings.keep_persona)

    def run_offline(self, settings: CallSettings, user_pcm: np.ndarray, progress: Callable[[int, int], None] | None = None,
                    waiting: Callable[[str], None] | None = None) -> OfflineResult:
        """The whole recording through the engine, at its pace, in a slot of its own. Only a share
        of the slots runs recordings (`offline_runs`): the others are kept for live calls, and a run
        beyond that share waits, saying so through `waiting`."""
        self._ready()
        if user_pcm.size == 0:
            raise AudioError("the recording is empty")
        if not self._offline.acquire(blocking=False):
            if waiting is not None:
                waiting("waiting for the runs ahead: live calls keep most of the engine's slots")
            self._offline.acquire()
        try:
            return self._run_offline(settings, user_pcm, progress)
        finally:
            self._offline.release()

    def _run_offline(self, settings: CallSettings, user_pcm: np.ndarray,
                     progress: Callable[[int, int], None] | None) -> OfflineResult:
        session = Session(OFFLINE)
        self.start_call(session, settings)
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
    return replace(settings, checkpoint=str(tiny_checkpoint), config=str(tiny_checkpoint / "tiny_config.json"), device="cpu")
