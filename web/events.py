"""What the page's events do: the API's endpoints and the page's own controls, each a function of
the service and the values the page (or any client) sent.

Implements the public endpoints (`upload_voice`, `preview_voice`, `generate_offline`,
`list_voices`, `list_personas`: named, typed parameters and returns), each behind `in_words`
(a `UserError` is said as it is, any other fault logged and said in one line); and the page's
own: a page session's token (`new_owner`), its call's files (`call_files`, for that page only),
the status line, the voice list once the model is ready, the persona's summary and role, the
role's length. Nothing here holds state: the service and the page's `gr.State` do.
"""

from __future__ import annotations

import functools
import html
import logging
import secrets
from collections.abc import Callable
from typing import Any, NamedTuple, TypedDict

import gradio as gr
import numpy as np
import spaces

from personaplex.runtime.audio import read_audio, wav_bytes
from personaplex.serve import inputs
from personaplex.serve.contract import MAX_ROLE_CHARS, CallService, State, UserError
from web.gradio_queue import short_reason
from web.values import (
    CUSTOM_VOICE,
    RELEASE_VOICES,
    SAMPLING_NAMES,
    page_settings,
    voice_choices,
    voice_key,
    voice_label,
)

logger = logging.getLogger("personaplex.app")


def new_owner() -> str:
    """A page session's token: what it made can be fetched with it, and with nothing else."""
    return secrets.token_urlsafe(24)


def call_files(service: CallService, webrtc_value: Any, owner: Any):
    """After a call (the page asks when it stopped one, or when the server ended it): this page's
    recording of that call and its transcript, once complete; nothing for any other page."""
    call_id = getattr(webrtc_value, "webrtc_id", webrtc_value)
    recording = service.files.find(owner if isinstance(owner, str) else None, call_id if isinstance(call_id, str) else None)
    if recording is None or not recording.closed.wait(5.0) or not recording.model_frames:
        hidden = gr.update(value=None, visible=False)
        return hidden, hidden
    return gr.update(value=str(recording.wav_path), visible=True), gr.update(value=str(recording.transcript_path), visible=True)


def status_markdown(service: CallService) -> str:
    """The engine now (`CallService.summary`), with a coloured dot."""
    summary = service.summary()
    text = f"<span class='dot {summary.level}'></span> **{summary.title}**: {html.escape(summary.text, quote=False)}"
    if service.status.state is State.FAILED:
        text += "\n\nFix the problem above and restart the app. The offline tab and live calls need the model."
    return text


def checkpoint_voices(service: CallService, current: Any):
    """A page opened before the model was ready: once it is, the checkpoint's own voice list,
    and its timer stops. (Each update of a component makes Gradio keep one more copy of it in
    the page's session, so nothing that ticks for the page's whole life may send one.)"""
    if not service.status.ready:
        return gr.skip(), gr.skip()
    voices = service.voice_names()
    if current in voices or current == CUSTOM_VOICE:  # (`current` left the page before this tick: the
        return gr.update(choices=voice_choices(voices)), gr.Timer(active=False)  # person may have chosen since)
    return gr.update(choices=voice_choices(voices), value=voices[0]), gr.Timer(active=False)


def persona_summary(persona: Any, voice: Any) -> str:
    """The persona and the voice in one line above the call, with a link to change them (shown on
    a phone, where the pickers sit below the call)."""
    who = persona if isinstance(persona, str) else "Custom role"
    sounds = "your custom voice" if voice == CUSTOM_VOICE else voice_label(voice) if isinstance(voice, str) else "?"
    return (f"<a class='summary' href='#settings'>{html.escape(who, quote=False)} · {html.escape(sounds, quote=False)}"
            " <span>(change)</span></a>")


def role_counter(text: str | None) -> str:
    n = len(text) if isinstance(text, str) else 0
    if n > MAX_ROLE_CHARS:
        return f"<span class='warn'>⚠ {n} / {MAX_ROLE_CHARS} characters: too long, shorten it before you start</span>"
    return f"<small>{n} / {MAX_ROLE_CHARS} characters</small>"


def pick_persona(service: CallService, personas: dict[str, dict], name: Any, current: Any):
    """The persona's role text, and its voice when the checkpoint has it."""
    persona = personas.get(name) if isinstance(name, str) else None
    if persona is None:  # not one of the presets (an API client): change nothing
        return gr.update(), gr.update()
    wanted = persona.get("voice")
    available = service.voice_names() or RELEASE_VOICES
    return persona["prompt"], gr.update(value=wanted if wanted in available else current)


def in_words(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A public endpoint's boundary: a `UserError` is said as it is; any other exception is a fault,
    logged with its traceback and said in one line (never an error without a message)."""

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except UserError as exc:
            raise gr.Error(str(exc), print_exception=False) from exc
        except Exception as exc:
            logger.exception("%s failed", fn.__name__)
            raise gr.Error(f"{fn.__name__.replace('_', ' ')} failed: {short_reason(exc)}", print_exception=False) from exc

    return checked


@in_words
def preview_voice(service: CallService, voice: Any, custom_voice: Any = "") -> str:
    """A few seconds of the model greeting you in a voice (made by the model on silence, then
    cached): the audio file."""
    return str(service.voice_preview(voice_key(voice, custom_voice, True)))


class Upload(NamedTuple):
    """What an uploaded voice clip did: the API returns `message` and `heard`."""

    message: str
    heard: str | None  # the custom voice in use, as the model hears it (a file), if there is one
    key: str  # the page's custom voice (the service's key)
    kept: str | None  # `heard`, kept for the page (shown again when a later clip is refused)
    outcome: str  # "ready", "refused", or "" (nothing changed)


@in_words
def upload_voice(service: CallService, voice_clip: Any, consent: Any, custom_voice: Any = "", heard: Any = None,
                 page: str = "") -> Upload:
    """A voice clip (uploaded or recorded), checked and encoded, becomes this page's custom voice
    (`page`: the page session, whose own it is), once the consent box is ticked. A refused clip
    leaves the previous custom voice in place."""
    key = custom_voice if isinstance(custom_voice, str) else ""
    heard = heard if isinstance(heard, str) else None
    if not voice_clip or not isinstance(voice_clip, str):
        return Upload("", heard, key, heard, "")
    try:
        if not inputs.flag("the consent box", consent):
            return Upload("⚠ Tick the consent box to use this clip.", heard, key, heard, "")
        voice = service.add_custom_voice(voice_clip, page)
    except UserError as exc:
        kept = " The previous custom voice is kept." if key else ""
        return Upload(f"⚠ {html.escape(str(exc), quote=False)}.{kept}", heard, key, heard, "refused")
    clip = str(voice.clip)
    return Upload(f"✅ Custom voice ready ({voice.seconds:.1f} s). It is selected in the voice list.", clip, voice.key, clip,
                  "ready")


def show_upload(outcome: Any):
    """The page after an upload: a ready voice is selected and can be played back; a refused clip
    leaves the box (it takes a new one)."""
    if outcome == "ready":
        return gr.update(value=CUSTOM_VOICE), gr.skip(), gr.update(visible=True)
    if outcome == "refused":
        return gr.skip(), gr.update(value=None), gr.skip()
    return gr.skip(), gr.skip(), gr.skip()


class VoiceInfo(TypedDict):
    name: str  # what `voice` takes
    label: str  # what it sounds like


class PersonaInfo(TypedDict):
    name: str
    prompt: str  # the role prompt
    voice: str  # the voice it suggests


def list_voices(service: CallService) -> list[VoiceInfo]:
    """The voices of the loaded checkpoint: name (what `voice` takes) and what it sounds like."""
    return [VoiceInfo(name=n, label=voice_label(n)) for n in service.voice_names()]


def list_personas(personas: dict[str, dict]) -> list[PersonaInfo]:
    """The page's persona presets: name, role prompt and suggested voice."""
    return [PersonaInfo(name=n, prompt=p["prompt"], voice=p.get("voice", "")) for n, p in personas.items()]


def check_offline_input(user_audio: Any) -> None:
    if not user_audio or not isinstance(user_audio, str):
        raise gr.Error("Upload or record the user's side first.", print_exception=False)


def offline_files(service: CallService, user: np.ndarray, agent: np.ndarray, transcript: str) -> list[str]:
    """The offline run's downloads, in a folder of the service's file store (deleted after a while)."""
    folder = service.files.folder()
    contents = {"model.wav": wav_bytes(agent), "both.wav": wav_bytes(np.stack([user, agent], axis=1)),
                "transcript.txt": (transcript or "(nobody said anything)\n").encode()}
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    return [str(folder / name) for name in contents]


@spaces.GPU(duration=120)
@in_words
def generate_offline(service: CallService, user_audio: Any, role_prompt: Any, voice: Any, custom_voice: Any, consent: Any,
                     text_temperature: Any, text_top_k: Any, audio_temperature: Any, audio_top_k: Any, seed: Any, greedy: Any,
                     progress=gr.Progress()):  # noqa: B008 (Gradio reads it from the signature)
    """The model's side of a recorded conversation: its audio (as long as the input), a stereo mix of
    both sides, the conversation as text, and the three files."""
    check_offline_input(user_audio)
    values = {"role": role_prompt, "voice": voice, "custom_voice": custom_voice, "consent": consent}
    sampling = (text_temperature, text_top_k, audio_temperature, audio_top_k, seed, greedy)
    settings = page_settings({**values, **dict(zip(SAMPLING_NAMES, sampling, strict=True))})
    pcm = read_audio(user_audio, max_seconds=600)
    result = service.run_offline(settings, pcm, lambda done, total: progress(done / total, desc="generating"),
                                 waiting=lambda text: progress(0.0, desc=text))
    text = result.transcript.render()
    files = offline_files(service, result.user, result.agent, text)
    return files[0], files[1], text, files

