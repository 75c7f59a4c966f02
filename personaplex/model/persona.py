"""Persona prompts: a voice prompt and a role text -> the frames that LMGen forces.

Implements:
  * `VoicePrompt`: a voice as Mimi codes of its audio, or as the reference's saved `.pt`
    (the input embeddings of frames 1..N-1 and the token ring after the voice);
  * `voice_frames(pcm)`: a voice clip as Mimi's input (`Engine.voice_pieces` encodes it);
  * `build_prompt(voice, role_tokens, cfg)`: the PersonaPlex system prompt, as the reference builds it:
    the voice, 0.5 s of silence, the role text, 0.5 s of silence. During all of it the user
    stream carries the "sine" tokens and the agent's text is padding, except for the role
    tokens; the agent's audio is the voice, then the silence tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .config import (
    CODES_PER_STREAM,
    FRAME_SIZE,
    PROMPT_SILENCE_FRAMES,
    SILENCE_TOKENS,
    SINE_TOKENS,
    TEXT_PAD_ID,
    LMConfig,
)
from .generate import RING_SIZE, PromptFrames


class PromptError(UserError):
    """A persona prompt that cannot be used (too long, malformed voice)."""


@dataclass(frozen=True)
class VoicePrompt:
    codes: torch.Tensor | None = None  # [8, N] Mimi codes of the voice audio
    embeddings: torch.Tensor | None = None  # [N - 1, dim] saved transformer inputs (.pt)
    ring: torch.Tensor | None = None  # [17, 4] saved token ring after the voice (.pt)

    def __post_init__(self) -> None:
        if (self.codes is None) == (self.embeddings is None):
            raise PromptError("a voice prompt has either audio codes or saved embeddings")
        if self.codes is not None and (self.codes.dim() != 2 or self.codes.shape[0] != CODES_PER_STREAM or self.codes.shape[1] < 1):
            raise PromptError(f"voice codes must be [{CODES_PER_STREAM}, N >= 1], got {tuple(self.codes.shape)}")
        if self.embeddings is not None:
            if self.ring is None or self.embeddings.dim() != 2:
                raise PromptError("saved voice embeddings must be [N - 1, dim] with a token ring")

    @property
    def num_frames(self) -> int:
        if self.codes is not None:
            return self.codes.shape[1]
        assert self.embeddings is not None
        return self.embeddings.shape[0] + 1


def voice_from_saved(embeddings: torch.Tensor, cache: torch.Tensor, cfg: LMConfig) -> VoicePrompt:
    """The reference's `.pt` content: embeddings [N-1, 1, 1, dim], cache [1, 17, 4]."""
    expected_cache = (1, cfg.num_streams, RING_SIZE)
    if embeddings.dim() != 4 or tuple(embeddings.shape[1:]) != (1, 1, cfg.dim) or embeddings.shape[0] < 1:
        raise PromptError(f"voice embeddings must be [N, 1, 1, {cfg.dim}] for this model, got {tuple(embeddings.shape)}")
    if tuple(cache.shape) != expected_cache:
        raise PromptError(f"voice cache must be {list(expected_cache)}, got {list(cache.shape)}")
    return VoicePrompt(embeddings=embeddings[:, 0, 0], ring=cache[0].long())


def voice_frames(pcm: torch.Tensor) -> torch.Tensor:
    """A voice clip [T] float32 at 24 kHz as Mimi's input [1, 1, F * 1920], the last frame zero-padded."""
    if pcm.dim() != 1 or pcm.numel() == 0:
        raise PromptError("voice audio must be a non-empty mono clip")
    frames = -(-pcm.numel() // FRAME_SIZE)
    padded = torch.zeros(frames * FRAME_SIZE, dtype=torch.float32, device=pcm.device)
    padded[: pcm.numel()] = pcm
    return padded.view(1, 1, -1)


def build_prompt(voice: VoicePrompt, role_tokens: list[int], cfg: LMConfig) -> PromptFrames:
    """The system prompt's frames: voice, silence, role text, silence."""
    total = voice.num_frames + 2 * PROMPT_SILENCE_FRAMES + len(role_tokens)
    if total >= cfg.context:
        room = cfg.context - 1 - voice.num_frames - 2 * PROMPT_SILENCE_FRAMES
        raise PromptError(
            f"the role text is {len(role_tokens)} tokens; with this voice at most {max(room, 0)} fit "
            f"in the model's context of {cfg.context} frames: shorten it"
        )
    sine = torch.tensor(SINE_TOKENS)[:, None]  # [8, 1]
    silence = torch.tensor(SILENCE_TOKENS)[:, None]

    def frames(text: list[int], agent: torch.Tensor) -> torch.Tensor:
        n = len(text)
        return torch.cat([torch.tensor(text, dtype=torch.long)[None], agent.expand(-1, n), sine.expand(-1, n)], dim=0)  # [17, n]

    n_voice = voice.num_frames
    # A saved voice replaces its frames' inputs by embeddings: the tokens there are never read.
    voice_agent = voice.codes.cpu() if voice.codes is not None else silence.expand(-1, n_voice)
    parts = [
        frames([TEXT_PAD_ID] * n_voice, voice_agent),
        frames([TEXT_PAD_ID] * PROMPT_SILENCE_FRAMES, silence),
        frames(list(role_tokens), silence),
        frames([TEXT_PAD_ID] * PROMPT_SILENCE_FRAMES, silence),
    ]
    tokens = torch.cat(parts, dim=1)
    embeddings = voice.embeddings.cpu() if voice.embeddings is not None else None
    ring = voice.ring.cpu() if voice.ring is not None else None
    return PromptFrames(tokens=tokens, embeddings=embeddings, voice_ring=ring)
