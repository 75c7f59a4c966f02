"""Engine: the loaded models on one device, a fixed number of conversation slots, batched steps.

Implements `Engine`:
  * `prepare_voice(name or pcm)` and `prompt(voice, role)`: a persona as `PromptFrames`;
  * `start(slot, prompt, sampling)`: reset one slot (Mimi and LM state), give it its sampling
    settings and run its system prompt, as one prefill or frame by frame;
  * `step(pcm)`: one 80 ms frame for every slot at once: Mimi encode of the user's audio, one
    LM step, Mimi decode of the agent's codes -> `Frame` (agent audio and text ids).
Every state tensor has a leading slot dimension and every slot its own offsets, so slots start
and stop independently while the others keep talking. No host synchronisation in `step`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .audio import normalize_loudness, read_audio
from .config import CODES_PER_STREAM, FRAME_SIZE, SILENCE_TOKENS
from .generate import LMGen, PromptFrames, PromptPlan, plan_prompt
from .graphs import StepGraphs, graphs_enabled
from .loading import CheckpointError, Models, load_voice_embeddings
from .persona import PromptError, VoicePrompt, build_prompt, encode_voice
from .sampling import SamplingParams
from .streaming import SwappedStates, enable_streaming, installed, reset_slots, slot_mask, slot_states, slot_view
from .text import encode_role

logger = logging.getLogger(__name__)


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
    ) -> None:
        self.models = models
        self.num_slots = num_slots
        self.device = models.device
        self.gen = LMGen(models.lm, depformer_steps)
        enable_streaming(models.mimi, num_slots)
        enable_streaming(self.gen, num_slots)
        self._silence = torch.tensor(SILENCE_TOKENS, device=self.device)[None]  # [1, 8]
        self._views: dict[tuple[int, int], SwappedStates] = {}  # slot range -> its state views
        self._graphs: StepGraphs | None = None
        if graphs_enabled(self.device) if cuda_graphs is None else cuda_graphs:
            self._graphs = self._capture_graphs()

    @torch.inference_mode()
    def _capture_graphs(self) -> StepGraphs | None:
        graphs = StepGraphs(self._step_bucket, lambda b: (b, FRAME_SIZE), self.device)
        try:
            graphs.capture(self.buckets())
        except RuntimeError:  # a faster engine is not worth a failed start: run eagerly
            logger.exception("capturing the engine step in CUDA graphs failed; running without them")
            graphs = None
        reset_slots(self.models.mimi, None)  # capture stepped every slot: start them afresh
        reset_slots(self.gen, None)
        return graphs

    # --- personas -----------------------------------------------------------------------
    def voice_from_file(self, path: Path) -> VoicePrompt:
        """A voice prompt from a `.pt` file or from an audio file (normalised to -24 LUFS)."""
        if path.suffix.lower() == ".pt":
            return load_voice_embeddings(path, self.models.config)
        return self.voice_from_audio(read_audio(path))

    def voice_from_audio(self, pcm: np.ndarray) -> VoicePrompt:
        normalised = torch.from_numpy(normalize_loudness(pcm)).to(self.device)
        with torch.inference_mode():
            return encode_voice(self.models.mimi, normalised)

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
    def plan(self, prompt: PromptFrames) -> PromptPlan:
        """The prefill's inputs and final ring for a prompt: host work, any thread."""
        if not 2 <= prompt.num_frames < self.models.config.lm.context:
            raise PromptError(f"a prompt needs 2 to {self.models.config.lm.context - 1} frames, got {prompt.num_frames}")
        return plan_prompt(prompt, self.models.config.lm)

    @torch.inference_mode()
    def start(self, slot: int, prompt: PromptFrames | PromptPlan, sampling: SamplingParams, prefill: bool = True) -> None:
        """Reset `slot` and run its system prompt (one prefill, or frame by frame as the
        reference does); the other slots are not touched."""
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not in 0..{self.num_slots - 1}")
        if isinstance(prompt, PromptFrames) and (prefill or not 2 <= prompt.num_frames < self.models.config.lm.context):
            prompt = self.plan(prompt)
        mask = slot_mask(self.num_slots, slot, self.device)
        reset_slots(self.models.mimi, mask)
        reset_slots(self.gen, mask)
        self.gen.set_sampling(mask, sampling)
        with slot_view(self.gen, slice(slot, slot + 1)):
            if isinstance(prompt, PromptPlan):
                self.gen.prefill(prompt)
            else:
                self.gen.run_prompt(prompt)

    def buckets(self) -> list[int]:
        """Batch sizes a tick may use: powers of two below `num_slots`, and `num_slots`."""
        sizes = [1 << i for i in range(self.num_slots.bit_length()) if 1 << i < self.num_slots]
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
        return self._step_bucket(pcm.to(self.device), bucket)

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
        mimi = self.models.mimi
        # 1. the user's audio -> Mimi codes
        user_codes = mimi.encode(pcm[:, None])[:, :, 0]  # [B, 8]
        # 2. one LM step: text and the agent's codes
        out = self.gen.step(user_codes)
        # 3. the agent's codes -> audio; a slot never started has start tokens: decode silence there
        codes = torch.where(out.valid[:, None], out.agent_codes, self._silence)
        agent = mimi.decode(codes[:, :, None])[:, 0]  # [B, 1920]
        return Frame(pcm=agent, tokens=out.tokens, valid=out.valid)
