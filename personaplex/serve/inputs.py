"""Values from a client, checked at the boundary: any JSON value in, a typed value or a message out.

Implements `text`, `number`, `whole` and `flag` (one value each, with the setting's name in the
message) and `sampling_settings` (the six sampling controls -> `SamplingParams`, seed -1 for a
fresh random one). Everything a browser or an API client sends may be null, a string where a
number belongs, NaN, a list, or out of range: each raises `SettingsError` saying which setting
is wrong and what it accepts. Ranges themselves live with what uses them (`SamplingParams`).
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import SettingsError
from ..model.config import SamplingParams, random_seed

RANDOM_SEED = -1


def text(name: str, value: Any, empty_if_none: bool = True, max_chars: int | None = None) -> str:
    if value is None and empty_if_none:
        return ""
    if not isinstance(value, str):
        raise SettingsError(f"{name} must be text, got {_shown(value)}")
    if max_chars is not None and len(value) > max_chars:
        raise SettingsError(f"{name} is {len(value)} characters long; at most {max_chars} are accepted")
    return value


def number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SettingsError(f"{name} must be a number, got {_shown(value)}")
    return float(value)


def whole(name: str, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON numbers from a page may arrive as 25.0
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingsError(f"{name} must be a whole number, got {_shown(value)}")
    return value


def flag(name: str, value: Any) -> bool:
    """True or false; the strings "true" and "false" mean what they say (not truthiness)."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise SettingsError(f"{name} must be true or false, got {_shown(value)}")
    return value


def sampling_settings(temp_text: Any, topk_text: Any, temp_audio: Any, topk_audio: Any, seed: Any, greedy: Any) -> SamplingParams:
    """The page's sampling controls; a seed of -1 (or none) draws a fresh one."""
    seed_value = RANDOM_SEED if seed is None else whole("the seed", seed)
    return SamplingParams(
        temp_text=number("the text temperature", temp_text),
        topk_text=whole("the text top-k", topk_text),
        temp_audio=number("the audio temperature", temp_audio),
        topk_audio=whole("the audio top-k", topk_audio),
        greedy=flag("greedy", greedy),
        seed=random_seed() if seed_value == RANDOM_SEED else seed_value,
    )


def _shown(value: Any) -> str:
    shown = "nothing" if value is None else repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."
