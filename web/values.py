"""What the page's controls mean: personas, voices by name and label, a call's settings from its values.

Implements `load_personas` (the presets of `assets/personas.json`), `voice_label` /
`voice_choices` (the release's voice names in words), `voice_key` (the chosen voice as the
service names it: a checkpoint voice, or this page's upload) and `page_settings` (the page's
values, by name, as a `CallSettings`: every value checked, since any JSON may arrive through
Gradio's API); `as_sent` and `whole_number` (how a control's value reaches the app).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import gradio as gr

from personaplex.serve import inputs
from personaplex.serve.contract import MAX_VOICE_NAME_CHARS, AudioError, CallSettings

ASSETS = Path(__file__).resolve().parents[1] / "assets"
RELEASE_VOICES = [f"NAT{g}{i}" for g in "FM" for i in range(4)] + [f"VAR{g}{i}" for g in "FM" for i in range(5)]
CUSTOM_VOICE = "Custom voice (uploaded)"
SAMPLING_NAMES = ("temp_text", "topk_text", "temp_audio", "topk_audio", "seed", "greedy")
CALL_INPUT_NAMES = ("owner", "role", "voice", "custom_voice", "consent", *SAMPLING_NAMES, "mute", "keep_persona")  # what a call reads


def load_personas() -> tuple[dict[str, dict], str]:
    raw = json.loads((ASSETS / "personas.json").read_text())
    return {p["name"]: p for p in raw["personas"]}, raw["default"]


def voice_label(name: str) -> str:
    """NATF2 -> "NATF2 · natural, female": the release's names say what the voice is."""
    match = re.fullmatch(r"(NAT|VAR)([FM])\d+", name)
    if match is None:
        return name
    kind = {"NAT": "natural", "VAR": "varied"}[match[1]]
    return f"{name} · {kind}, {'female' if match[2] == 'F' else 'male'}"


def voice_choices(names: list[str]) -> list[tuple[str, str]]:
    return [(voice_label(n), n) for n in names] + [(CUSTOM_VOICE, CUSTOM_VOICE)]


def voice_key(voice: Any, custom_voice: Any, consent: Any) -> str:
    """The service's name for the chosen voice: a checkpoint voice, or this page's upload."""
    voice = inputs.text("the voice", voice, empty_if_none=False, max_chars=MAX_VOICE_NAME_CHARS)
    if voice != CUSTOM_VOICE:
        return voice
    if not inputs.text("the custom voice", custom_voice) or not inputs.flag("the consent box", consent):
        raise AudioError("upload or record a custom voice and tick the consent box, or pick a voice from the list")
    return custom_voice


def page_settings(values: dict[str, Any]) -> CallSettings:
    """A call's settings from the page's values by name (`role`, `voice`, `custom_voice`,
    `consent`, the `SAMPLING_NAMES`, and `keep_persona`: the persona kept when it is absent)."""
    role = inputs.text("the role prompt", values["role"])
    voice = voice_key(values["voice"], values["custom_voice"], values["consent"])
    sampling = inputs.sampling_settings(*(values[name] for name in SAMPLING_NAMES))
    keep = inputs.flag("the keep-persona switch", values.get("keep_persona", True))
    return CallSettings(voice, role, sampling, keep)


def as_sent(component: gr.components.Component) -> gr.components.Component:
    """Let the component's value reach the app as the client sent it (any JSON). The app checks
    it (`personaplex.serve.inputs`) and says on the page what is wrong; Gradio's own range check
    would refuse the whole settings event instead, and the call would wait for settings that never
    come. (An instance attribute, not a subclass: Gradio writes a .pyi file next to the module
    of every Component subclass.)"""
    component.preprocess = lambda payload: payload  # type: ignore[method-assign]
    return component


def whole_number(component: gr.components.Component) -> gr.components.Component:
    """A slider of whole numbers, typed so in the API (Gradio's slider says "number": a float)."""
    component.api_info = lambda: {"type": "integer"}  # type: ignore[method-assign]
    return component
