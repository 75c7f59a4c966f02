"""The system prompt's frames and the role text."""

from __future__ import annotations

import pytest
import torch

from personaplex.model.config import SILENCE_TOKENS, SINE_TOKENS, TEXT_PAD_ID, TINY
from personaplex.model.persona import PromptError, VoicePrompt, build_prompt
from personaplex.model.text import Words, encode_role, wrap_with_system_tags


def test_prompt_frames_are_voice_silence_text_silence():
    codes = torch.arange(8 * 5).view(8, 5)
    frames = build_prompt(VoicePrompt(codes=codes), [40, 41, 42], TINY.lm).tokens
    assert frames.shape == (17, 5 + 6 + 3 + 6)
    assert torch.equal(frames[1:9, :5], codes)
    assert torch.all(frames[1:9, 5:] == torch.tensor(SILENCE_TOKENS)[:, None])
    assert torch.all(frames[9:] == torch.tensor(SINE_TOKENS)[:, None])
    assert frames[0].tolist() == [TEXT_PAD_ID] * 11 + [40, 41, 42] + [TEXT_PAD_ID] * 6


def test_empty_role_skips_the_text_segment(models):
    assert encode_role("", models.tokenizer) == [] and encode_role("   ", models.tokenizer) == []
    frames = build_prompt(VoicePrompt(codes=torch.zeros(8, 2, dtype=torch.long)), [], TINY.lm)
    assert frames.num_frames == 2 + 12


def test_system_tags_are_added_once():
    assert wrap_with_system_tags("  Hi there ") == "<system> Hi there <system>"
    assert wrap_with_system_tags("<system> Hi <system>") == "<system> Hi <system>"


def test_odd_unicode_is_tokenised_as_is(models):
    ids = encode_role("Tu es 🚀 Zoë, naïve — ok?", models.tokenizer)
    assert ids and all(0 <= i < 120 for i in ids)


def test_labels_match_the_reference_json(models):
    words = Words(models.tokenizer)
    assert words.label(3) == "PAD" and words.label(0) == "EPAD"
    assert words.label(models.tokenizer.piece_to_id("▁re")) == " re"


def test_malformed_voices_are_refused():
    with pytest.raises(PromptError):
        VoicePrompt()
    with pytest.raises(PromptError, match=r"\[8, N >= 1\]"):
        VoicePrompt(codes=torch.zeros(7, 3, dtype=torch.long))
    with pytest.raises(PromptError, match="token ring"):
        VoicePrompt(embeddings=torch.zeros(3, 32))
