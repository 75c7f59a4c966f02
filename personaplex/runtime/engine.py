"""Engine: the loaded models on one device, a fixed number of conversation slots, batched steps.

Implements `Engine`:
  * `voice(name)`, `voice_from_file`, `voice_from_audio` and `prompt(voice, role)`: a persona
    as `PromptFrames`; `voice_pieces(pcm)`: a clip encoded a few frames at a time;
  * `start(slot, prompt, sampling)`: reset one slot (Mimi and LM state), give it its sampling
    settings and run its system prompt, as one prefill or frame by frame; `start_pieces`: the
    prefill in pieces, run in states of their own and copied into the slot at the end, so that
    ticks may step every slot in between;
  * `move(src, dst)`: a conversation moved to another slot (a lone talker in a high slot would
    make every tick step a large bucket);
  * `step(pcm)`: one 80 ms frame for every slot at once: Mimi encode of the user's audio, one
    LM step, Mimi decode of the agent's codes -> `Frame` (agent audio and text ids);
    `step_host`: the same from and to pinned host buffers, with asynchronous copies.
Every state tensor has a leading slot dimension and every slot its own offsets, so slots start
and stop independently while the others keep talking. No host synchronisation in `step`. The
tick's hot pieces are compiled (`compiled`) and each bucket's tick captured in a CUDA graph
(`graphs`) on a GPU; the model itself knows nothing of either. (Some 400 lines: one class, a
slot's whole life on the device, whose every method moves the same states.)
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..model.config import CODES_PER_STREAM, FRAME_SIZE, SILENCE_TOKENS, SamplingParams
from ..model.formats import weight_bytes
from ..model.generate import LMGen, PreparedPrompt, PromptFrames, prepare_prompt
from ..model.loading import CheckpointError, Models, load_voice_embeddings
from ..model.persona import PromptError, VoicePrompt, build_prompt, voice_frames
from ..model.streaming import (
    SwappedStates,
    copy_states,
    enable_streaming,
    fresh_states,
    installed,
    reset_slots,
    slot_mask,
    slot_states,
    slot_view,
)
from ..model.text import encode_role
from .audio import normalize_loudness, read_audio
from .batch_graphs import tracing_every_batch
from .compiled import TickPieces, compile_enabled, compile_tick, compiled_pieces, eager_pieces, prefix_route
from .graphs import StepGraphs, graphs_enabled
from .host import HostBuffers, HostFrame

logger = logging.getLogger(__name__)

PREFILL_PIECE_FRAMES = 16  # a piece of a prefill: a few ms of a GPU, so that it fits between two ticks
VOICE_PIECE_FRAMES = 2  # a piece of a voice clip's encoding (Mimi on a CPU: about 4 ms a frame)
_DONE = object()


@dataclass
class Frame:
    pcm: torch.Tensor  # [B, 1920] float32 agent audio
    tokens: torch.Tensor  # [B, 17] text id, agent codes, user codes of the frame
    valid: torch.Tensor  # [B] bool

    @property
    def text(self) -> torch.Tensor:
        return self.tokens[:, 0]  # PAD / EPAD when the agent says nothing new


class Engine:
    """Takes over the streaming state of `models`: one engine per loaded model at a time."""

    def __init__(
        self,
        models: Models,
        num_slots: int = 1,
        depformer_steps: int = CODES_PER_STREAM,
        cuda_graphs: bool | None = None,
        pinning: bool = False,
        compile: bool | None = None,
        prefix_attention: bool | None = None,
        one_graph: bool = True,
        kv_cache: str = "bf16",
    ) -> None:
        self.models = models
        self.num_slots = num_slots
        self.device = models.device
        self.gen = LMGen(models.lm, depformer_steps, pinning, kv_cache)  # pinning: slots may keep their persona (`start`)
        compiling = compile_enabled(self.device) if compile is None else compile
        self._prefix_asked = prefix_attention  # None: when compiled (`compiled.prefix_route`)
        self.gen.use_prefix_attention(prefix_route(prefix_attention, compiling, pinning, self.device))
        enable_streaming(models.mimi, num_slots)
        enable_streaming(self.gen, num_slots)
        self._silence = torch.tensor(SILENCE_TOKENS, device=self.device)[None]  # [1, 8]
        self._views: dict[tuple[int, int], SwappedStates] = {}  # slot range -> its state views
        # States of work in pieces, one slot's worth each, made here (a 7B's KV cache is 1.5 GB:
        # not an allocation to make in the middle of live calls). Work of a kind runs one at a time.
        self._own: dict[str, SwappedStates] = {"prefill": fresh_states(self.gen, 1), "voice": fresh_states(models.mimi, 1)}
        self._parked: set[int] = set()  # slots whose attention window stays empty until their start (`park`)
        # Each compiled piece one graph for every bucket (`batch_graphs`), or (`one_graph=False`, to
        # measure against) one per bucket, the bucket of one slot included.
        self._every_batch = compiling and num_slots > 1 and one_graph
        self._smallest_bucket = 2 if self._every_batch else 1
        self._pieces = eager_pieces(models.mimi, self.gen)
        self.compile_failed: str | None = None  # why the step runs eagerly although compiling was asked for
        self.prefix_attention_failed: str | None = None  # why compiled attention reads every ring entry
        self.every_batch_failed: str | None = None  # why the pieces were compiled once per bucket instead
        if compiling:
            self._compile(drop_flex=prefix_attention is None)
        self._graphs: StepGraphs | None = None
        self.graphs_failed: str | None = None  # why the step runs without CUDA graphs although they were asked for
        if graphs_enabled(self.device) if cuda_graphs is None else cuda_graphs:
            self._graphs = self._capture_graphs()
        self._host = HostBuffers(num_slots, self.device)

    @property
    def cuda_graphs(self) -> bool:
        return self._graphs is not None

    @property
    def compiled(self) -> bool:
        return self._pieces.compiled

    @property
    def shortfalls(self) -> list[str]:
        """What runs slower than it should, and why (for the status line): "without CUDA graphs
        (...)", "uncompiled (...)", "with attention over every slot's whole window (...)"."""
        found = []
        if self.graphs_failed:
            found.append(f"without CUDA graphs (their capture failed: {self.graphs_failed})")
        if self.compile_failed:
            found.append(f"uncompiled (torch.compile failed: {self.compile_failed})")
        elif self.prefix_attention_failed:
            found.append(f"with attention over every slot's whole window (the flex kernel failed: {self.prefix_attention_failed})")
        return found

    def weight_bytes(self) -> int:
        """The LM's weights as held (8-bit ones with their scales)."""
        return weight_bytes(self.models.lm)

    def kv_bytes(self) -> int:
        """Every slot's LM KV cache as held."""
        return self.gen.kv_bytes()

    @property
    def prefix_attention(self) -> bool:
        """Whether the tick's attention reads only what each slot holds (`LMGen.prefix_attention`)."""
        return self.gen.prefix_attention

    def compile_steps(self, on: bool) -> None:
        """The tick's pieces compiled (`compiled.compiled_pieces`) or eager, and the attention route
        that goes with it, with no warm-up: compiled, each piece is compiled at its first tick
        (`Engine(compile=True)` does that at once, with its fallbacks)."""
        mimi = self.models.mimi
        self._pieces = compiled_pieces(mimi, self.gen, self._every_batch) if on else eager_pieces(mimi, self.gen)
        self.gen.use_prefix_attention(prefix_route(self._prefix_asked, on, self.gen.pinning, self.device))

    @torch.inference_mode()
    def _compile(self, drop_flex: bool) -> None:
        """Compile the tick's pieces and run them at every bucket now, before any graph is
        captured and any call waits; whatever failed on the way is said (`shortfalls`)."""
        graphs = 2 * len(self.buckets()) + 2  # room for a graph per bucket, should a piece need that
        result = compile_tick(self.models.mimi, self.gen, self._every_batch, drop_flex, self._warm_buckets, graphs)
        self._pieces, self._every_batch = result.pieces, result.every_batch
        self.compile_failed, self.prefix_attention_failed = result.failed, result.prefix_failed
        self.every_batch_failed = result.every_batch_failed
        self._reset_all()  # the warm-up stepped every slot: start them afresh

    def _warm_buckets(self, pieces: TickPieces) -> str | None:
        """Step every bucket once with `pieces`, the largest first (its call compiles what is
        compiled for them all); what failed, if anything."""
        self._pieces = pieces
        try:
            with tracing_every_batch():
                for bucket in reversed(self.buckets()):
                    self._step_bucket(torch.zeros(bucket, FRAME_SIZE, device=self.device), bucket)
        except Exception as exc:
            logger.exception("compiling the engine step failed")
            return f"{type(exc).__name__}: {exc}"
        return None

    @torch.inference_mode()
    def _capture_graphs(self) -> StepGraphs | None:
        graphs = StepGraphs(self._step_bucket, lambda b: (b, FRAME_SIZE), self.device)
        try:
            graphs.capture(self.buckets())
        except RuntimeError as exc:  # a slower engine is better than none: run eagerly, and say so
            logger.exception("capturing the engine step in CUDA graphs failed; running without them")
            self.graphs_failed = f"{type(exc).__name__}: {exc}"
            graphs = None
        self._reset_all()  # capture stepped every slot: start them afresh
        return graphs

    # --- personas -----------------------------------------------------------------------
    def voice_from_file(self, path: Path) -> VoicePrompt:
        """A voice prompt from a `.pt` file or from an audio file (normalised to -24 LUFS)."""
        if path.suffix.lower() == ".pt":
            return load_voice_embeddings(path, self.models.config)
        return self.voice_from_audio(read_audio(path))

    def voice_from_audio(self, pcm: np.ndarray) -> VoicePrompt:
        """A voice prompt from audio at 24 kHz (normalised to -24 LUFS here)."""
        return _finish(self.voice_pieces(normalize_loudness(pcm)))

    @torch.inference_mode()
    def voice_pieces(self, normalised: np.ndarray, frames: int = VOICE_PIECE_FRAMES) -> Generator[None, None, VoicePrompt]:
        """The voice prompt of a clip already at -24 LUFS (`normalize_loudness`), `frames`
        frames at a time: Mimi streams the clip in states of its own (streaming equals the
        whole-clip encode), yielding between pieces."""
        padded = voice_frames(torch.from_numpy(normalised)).to(self.device)  # [1, 1, F * 1920]
        states = self._own_states("voice", self.models.mimi)
        codes = []
        for piece in padded.split(frames * FRAME_SIZE, dim=-1):
            with installed(states):
                codes.append(self.models.mimi.encode(piece))  # [1, 8, frames]
            yield
        return VoicePrompt(codes=torch.cat(codes, dim=-1)[0])

    def voice(self, name: str) -> VoicePrompt:
        """A voice of the checkpoint by name (looked up in the fixed table, never a path)."""
        path = self.models.voices.get(name)
        if path is None:
            known = ", ".join(self.models.voices) or "none"
            raise CheckpointError(f"unknown voice {name!r}; this checkpoint has: {known}")
        return self.voice_from_file(path)

    def prompt(self, voice: VoicePrompt, role: str) -> PromptFrames:
        return build_prompt(voice, encode_role(role, self.models.tokenizer), self.models.config.lm)

    # --- slots --------------------------------------------------------------------------
    @torch.inference_mode()
    def prepare(self, prompt: PromptFrames) -> PreparedPrompt:
        """The prefill's inputs and final ring for a prompt: host work, any thread."""
        if not 2 <= prompt.num_frames < self.models.config.lm.context:
            raise PromptError(f"a prompt needs 2 to {self.models.config.lm.context - 1} frames, got {prompt.num_frames}")
        return prepare_prompt(prompt, self.models.config.lm)

    @torch.inference_mode()
    def start(self, slot: int, prompt: PromptFrames | PreparedPrompt, sampling: SamplingParams, prefill: bool = True,
              keep_persona: bool = False) -> None:
        """Reset `slot` and run its system prompt (one prefill, or frame by frame as the
        reference does); the other slots are not touched. With `keep_persona` (an engine made
        with `pinning=True`) the prompt stays in the slot's attention window for the whole call."""
        self._check_slot(slot)
        self._parked.discard(slot)
        if prefill or isinstance(prompt, PreparedPrompt):
            prepared = prompt if isinstance(prompt, PreparedPrompt) else self.prepare(prompt)
            _finish(self.start_pieces(slot, prepared, sampling, frames=prepared.inputs.shape[1], keep_persona=keep_persona))
            return
        self._check_pinning(keep_persona)
        mask = slot_mask(self.num_slots, slot, self.device)
        reset_slots(self.models.mimi, mask)
        reset_slots(self.gen, mask)
        self.gen.set_sampling(mask, sampling)
        with slot_view(self.gen, slice(slot, slot + 1)):
            self.gen.run_prompt(prompt)
            self.gen.pin_prompt(keep_persona)

    @torch.inference_mode()
    def start_pieces(self, slot: int, prepared: PreparedPrompt, sampling: SamplingParams,
                     frames: int = PREFILL_PIECE_FRAMES, keep_persona: bool = False) -> Iterator[None]:
        """`start` with a prefill of `frames` frames per piece, yielding between pieces. The
        prefill runs in states of its own; the slot is reset and takes them at the last piece,
        so the slot may be stepped (with silence) meanwhile."""
        self._check_slot(slot)
        self._check_pinning(keep_persona)
        own = self._own_states("prefill", self.gen)
        with installed(own):
            self.gen.set_sampling(torch.ones(1, dtype=torch.bool, device=self.device), sampling)
        pieces = self.gen.prefill_pieces(prepared, frames)
        while True:
            with installed(own):  # the pieces run in their own states, never in a tick's
                done = next(pieces, _DONE) is _DONE
            if done:
                break
            yield
        with installed(own):
            self.gen.pin_prompt(keep_persona)
        self._parked.discard(slot)
        reset_slots(self.models.mimi, slot_mask(self.num_slots, slot, self.device))
        copy_states(slot_states(self.gen, slice(slot, slot + 1)), own)

    def _check_pinning(self, keep_persona: bool) -> None:
        if keep_persona and not self.gen.pinning:
            raise ValueError("keep_persona needs an engine made with pinning=True")

    @torch.inference_mode()
    def park(self, slot: int) -> None:
        """`slot` holds no conversation (until its next `start`) but may still step in a bucket:
        its LM attention window stays empty instead of filling with silence. Cheap to repeat."""
        self._check_slot(slot)
        if slot in self._parked:
            return
        self.gen.park(slot_mask(self.num_slots, slot, self.device))
        self._parked.add(slot)

    @contextmanager
    def without_graphs(self) -> Iterator[None]:
        """Within the block the step runs without its CUDA graphs (to measure what they save)."""
        graphs, self._graphs = self._graphs, None
        try:
            yield
        finally:
            self._graphs = graphs

    @contextmanager
    def full_windows(self) -> Iterator[None]:
        """Within the block every slot's attention window is full, as after four minutes of
        talk: the worst case of a tick's attention, for a warm-up to measure. Afterwards every
        slot starts afresh."""
        self.gen.fill_windows()
        try:
            yield
        finally:
            self._reset_all()

    def _reset_all(self) -> None:
        reset_slots(self.models.mimi, None)
        reset_slots(self.gen, None)
        self._parked.clear()

    @torch.inference_mode()
    def move(self, src: int, dst: int) -> None:
        """The conversation of slot `src` continues in slot `dst` (every Mimi and LM state)."""
        self._check_slot(src)
        self._check_slot(dst)
        self._parked.discard(dst)
        copy_states(self._slot_range(dst, dst + 1), self._slot_range(src, src + 1))

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not in 0..{self.num_slots - 1}")

    def _own_states(self, work: str, root: torch.nn.Module) -> SwappedStates:
        """The states of `work` ("prefill" over the LM, "voice" over Mimi), reset."""
        states = self._own[work]
        with installed(states):
            reset_slots(root, None)
        return states

    def buckets(self) -> list[int]:
        """Batch sizes a tick may use: powers of two below `num_slots`, and `num_slots`; from 2
        when compiled (`batch_graphs`)."""
        sizes = [1 << i for i in range(self.num_slots.bit_length()) if self._smallest_bucket <= 1 << i < self.num_slots]
        return [*sizes, self.num_slots]

    def bucket_for(self, slots: int) -> int:
        """The smallest bucket that covers slots 0..slots-1."""
        return next(b for b in self.buckets() if b >= slots)

    @torch.inference_mode()
    def step(self, pcm: torch.Tensor, bucket: int | None = None) -> Frame:
        """pcm [bucket, 1920] float32 user audio for slots 0..bucket-1 (default: all slots)
        -> one frame of agent audio and text per slot. The other slots do not move. On CUDA the
        returned tensors are the graph's buffers: valid until the next step."""
        bucket = bucket or self.num_slots
        assert pcm.shape == (bucket, FRAME_SIZE), f"expected [{bucket}, {FRAME_SIZE}], got {tuple(pcm.shape)}"
        if self._graphs is not None and bucket in self._graphs:
            return self._graphs.run(pcm, bucket)  # type: ignore[return-value]
        pcm = pcm.to(self.device)
        if self.compiled and not pcm.is_inference():  # (on a CPU, `to` keeps it) the kind the compiled pieces
            pcm = pcm.clone()  # were traced with: another kind fails their guards, a new graph mid-call
        return self._step_bucket(pcm, bucket)

    @torch.inference_mode()
    def step_host(self, pcm: np.ndarray, bucket: int) -> HostFrame:
        """`step` from and to host memory, for the engine thread: the input goes through a pinned
        buffer with an asynchronous copy, the outputs come back the same way, and `HostFrame.ready`
        says when the device is done (the caller can sleep meanwhile instead of blocking)."""
        host = self._host
        host.pcm_in[:bucket].numpy()[:] = pcm
        out = self.step(host.pcm_in[:bucket].to(self.device, non_blocking=True), bucket)
        host.pcm_out[:bucket].copy_(out.pcm, non_blocking=True)
        host.text_out[:bucket].copy_(out.text, non_blocking=True)
        return HostFrame(host.pcm_out[:bucket].numpy(), host.text_out[:bucket].numpy(), host.event())

    @torch.inference_mode()
    def step_slot(self, pcm: torch.Tensor, slot: int) -> Frame:
        """One frame for one slot alone ([1, 1920] in), eagerly: the naive loop of the benchmark."""
        with installed(self._slot_range(slot, slot + 1)):
            return self._step(pcm.to(self.device))

    def _step_bucket(self, pcm: torch.Tensor, bucket: int) -> Frame:
        if bucket == self.num_slots:
            return self._step(pcm)
        with installed(self._slot_range(0, bucket)):
            return self._step(pcm)

    def _slot_range(self, start: int, stop: int) -> SwappedStates:
        """The Mimi and LM state views of slots start..stop-1, made once (not at every tick)."""
        key = (start, stop)
        if key not in self._views:
            index = slice(start, stop)
            self._views[key] = slot_states(self.models.mimi, index) + slot_states(self.gen, index)
        return self._views[key]

    def _step(self, pcm: torch.Tensor) -> Frame:
        # 1. the user's audio -> Mimi codes
        pieces = self._pieces
        user_codes = pieces.encode(pcm[:, None])[:, :, 0]  # [B, 8]
        # 2. one LM step: text and the agent's codes
        out = self.gen.step(user_codes, pieces.layer, pieces.heads)
        # 3. the agent's codes -> audio; a slot never started has start tokens: decode silence there
        codes = torch.where(out.valid[:, None], out.agent_codes, self._silence)
        agent = pieces.decode(codes[:, :, None])[:, 0]  # [B, 1920]
        return Frame(pcm=agent, tokens=out.tokens, valid=out.valid)


def _finish(pieces: Generator[None, None, object] | Iterator[None]):  # -> the generator's return value
    """Run work in pieces to its end, at once."""
    while True:
        try:
            next(pieces)
        except StopIteration as stop:
            return stop.value
