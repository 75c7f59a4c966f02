"""The text side: role prompts in, the agent's text pieces out.

Implements `wrap_with_system_tags`, `encode_role` (the prompt's token ids, no BOS/EOS; an empty
role gives no tokens, where the reference crashes) and `Words`, how the sampled text ids read:
`piece` as the official server sends them ('' for padding, else the piece with "▁" as a
space), `label` as the reference's offline script writes them ("PAD" for 3, "EPAD" for 0, else
the piece) and `caption` for people (the piece without the tokenizer's markers).
"""

from __future__ import annotations

from typing import Protocol

from .config import TEXT_EPAD_ID, TEXT_PAD_ID

SYSTEM_TAG = "<system>"
_PADDING_LABELS = {TEXT_EPAD_ID: "EPAD", TEXT_PAD_ID: "PAD"}


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def id_to_piece(self, token: int) -> str: ...

    def is_control(self, token: int) -> bool: ...

    def is_unknown(self, token: int) -> bool: ...


def wrap_with_system_tags(text: str) -> str:
    """`<system> text <system>`, unless the text already starts and ends with the tag."""
    cleaned = text.strip()
    if cleaned.startswith(SYSTEM_TAG) and cleaned.endswith(SYSTEM_TAG):
        return cleaned
    return f"{SYSTEM_TAG} {cleaned} {SYSTEM_TAG}"


def encode_role(text: str, tokenizer: Tokenizer) -> list[int]:
    """Token ids of the role prompt as the model reads it; [] for an empty (or blank) role."""
    if not text.strip():
        return []
    return list(tokenizer.encode(wrap_with_system_tags(text)))


class Words:
    """The text ids of one tokenizer in words."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def piece(self, token: int) -> str:
        """What the agent said at this step: '' for padding, else the piece with '▁' as a space."""
        if token in _PADDING_LABELS:
            return ""
        return self.tokenizer.id_to_piece(token).replace("▁", " ")

    def caption(self, token: int) -> str:
        """What a person reads for this step: `piece` without the tokenizer's control and unknown
        pieces (`<s>`, `</s>`, `<unk>`), which the model may emit but nobody says."""
        if self.tokenizer.is_control(token) or self.tokenizer.is_unknown(token):
            return ""
        return self.piece(token)

    def label(self, token: int) -> str:
        """The reference offline script's JSON entry for one frame."""
        return _PADDING_LABELS.get(token) or self.piece(token)
