"""PersonaPlex Live: talk with PersonaPlex-7B in the browser (Gradio 5 + fastrtc WebRTC).

UI only. The page is built at once; the model loads in the background (`personaplex.service`)
and a status line says what the engine is doing. A live call is a `personaplex.session.Session`,
which owns the conversation's timeline; the fastrtc handler here passes audio in and out and
sends the page what it shows of the call (`web.call_page`: who is speaking, the conversation
turn by turn, whether the call keeps real time) on the call's own data channel. Everything a
call leaves belongs to the browser session that made it: its connection answers only the page
that opened it (`web.connections`), and a per-page token kept on the server (`gr.State`) is
checked before its files are shown. A second tab runs the same engine on a recording. The API
lists only what a person would call (`PUBLIC_API`), with parameter names that say what they
are. What strangers can send is bounded at the door (`web.limits`, `web.gradio_queue`).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import html
import json
import logging
import os
import re
import secrets
import signal
import sys
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypedDict

import gradio as gr
import numpy as np
import spaces
from fastrtc import AsyncStreamHandler, WebRTC
from fastrtc.utils import create_message, get_current_context
from gradio.utils import get_upload_folder as gradio_upload_folder
from starlette.middleware import Middleware
from starlette.routing import WebSocketRoute

from personaplex.errors import SettingsError, UserError
from personaplex.model.config import SAMPLE_RATE
from personaplex.model.sampling import MAX_TOP_K, SEED_MAX, SamplingParams
from personaplex.runtime.audio import AudioError, HalfRate, float_to_int16, int16_to_float, read_audio, wav_bytes
from personaplex.runtime.session import REALTIME, Limits, Phase, Session
from personaplex.runtime.transcript import clock_text
from personaplex.serve import api_chat, inputs
from personaplex.serve.remote import RemoteService
from personaplex.serve.service import (
    CUSTOM_VOICE_SECONDS,
    MAX_ROLE_CHARS,
    Service,
    Settings,
    State,
    offline_runs,
    on_the_tiny_model,
)
from web import call_page
from web.call_page import CAPTION_TURNS, MESSAGE_TYPE, CallFigures, CallPage, idle_html
from web.connections import MAX_OPENING, CallConnections
from web.gradio_queue import explain_refusals, forget_finished_events, quiet_component_server, short_reason
from web.health import CallView
from web.limits import Limits as RequestSizes
from web.limits import RequestLimits

logger = logging.getLogger("personaplex.app")

ASSETS = Path(__file__).parent / "assets"
TINY_CHECKPOINT = Path(__file__).parent / "tests" / "fixtures" / "tiny" / "checkpoint"  # the release format, random weights
TINY_BANNER = (
    "<div class='banner'><b>This is the tiny test model, not PersonaPlex-7B.</b> No CUDA GPU was found, so the page "
    "runs the tiny random-weight model the tests use: it babbles (in real time on a CPU), to show how the page works. "
    "The real model needs a CUDA GPU with 24 GB or more; to choose a model yourself, start the app with "
    "<code>--checkpoint DIR</code>, <code>--hf-repo REPO</code> or <code>--device cpu</code> (the 7B, far slower than "
    "real time).</div>"
)
RELEASE_VOICES = [f"NAT{g}{i}" for g in "FM" for i in range(4)] + [f"VAR{g}{i}" for g in "FM" for i in range(5)]
CUSTOM_VOICE = "Custom voice (uploaded)"
MAX_NAME_CHARS = 64  # of a voice's name, as a client sends it
UPDATE_EVERY = 3  # frames between page updates (about 4 a second: who is speaking stays live)
MAX_BUFFERED = 64 * 1024  # bytes the call's channel has not sent yet beyond which an update is skipped (the next carries it)
LOGGED_CHARS = 300  # of a refusal's reason in the log
ARGS_TIMEOUT_S = 3.0  # the page sends a call's settings within this time of connecting, or the call ends
END_STREAM_DELAY_S = 0.3  # the last captions and files reach the page before the call is closed
CLOSE_DELAY_S = 0.5  # then the browser closes its side; the server closes its own after this
STATUS_EVERY_S = 2.0
INPUT_RATE = 2 * SAMPLE_RATE  # the microphone as fastrtc decodes it (Opus: 48 kHz)
SAMPLING_NAMES = ("temp_text", "topk_text", "temp_audio", "topk_audio", "seed", "greedy")
CALL_INPUT_NAMES = ("owner", "role", "voice", "custom_voice", "consent", *SAMPLING_NAMES, "mute", "keep_persona")  # what a call reads
SPARE_CONNECTIONS = 8  # connections beyond the calls and the openings: a caller refused as busy reads why
PREVIEWS_AT_ONCE = 1  # voice previews made at once (each holds a slot for a moment; then it is cached)
SESSIONS_KEPT = 500  # page sessions whose state Gradio keeps (110 KB each, measured); an open page stays (its status ticks)
PAGE_UP = "the page is up"  # logged with its address once the server listens
PUBLIC_API = ("generate_offline", "upload_voice", "preview_voice", "voices", "personas")


def load_personas() -> tuple[dict[str, dict], str]:
    raw = json.loads((ASSETS / "personas.json").read_text())
    return {p["name"]: p for p in raw["personas"]}, raw["default"]


def new_owner() -> str:
    """A page session's token: what it made can be fetched with it, and with nothing else."""
    return secrets.token_urlsafe(24)


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
    voice = inputs.text("the voice", voice, empty_if_none=False, max_chars=MAX_NAME_CHARS)
    if voice != CUSTOM_VOICE:
        return voice
    if not inputs.text("the custom voice", custom_voice) or not inputs.flag("the consent box", consent):
        raise AudioError("upload or record a custom voice and tick the consent box, or pick a voice from the list")
    return custom_voice


def call_settings(values: dict[str, Any]) -> tuple[str, str, SamplingParams]:
    """(voice, role, sampling) from the page's values, each checked (any JSON may arrive)."""
    role = inputs.text("the role prompt", values["role"])
    if len(role) > MAX_ROLE_CHARS:
        raise SettingsError(f"the role prompt is {len(role)} characters; the limit is {MAX_ROLE_CHARS}")
    voice = voice_key(values["voice"], values["custom_voice"], values["consent"])
    return voice, role, inputs.sampling_settings(*(values[name] for name in SAMPLING_NAMES))


def as_sent(component: gr.components.Component) -> gr.components.Component:
    """Let the component's value reach the app as the client sent it (any JSON). The app checks
    it (`personaplex.inputs`) and says on the page what is wrong; Gradio's own range check would
    refuse the whole settings event instead, and the call would wait for settings that never
    come. (An instance attribute, not a subclass: Gradio writes a .pyi file next to the module
    of every Component subclass.)"""
    component.preprocess = lambda payload: payload  # type: ignore[method-assign]
    return component


def whole_number(component: gr.components.Component) -> gr.components.Component:
    """A slider of whole numbers, typed so in the API (Gradio's slider says "number": a float)."""
    component.api_info = lambda: {"type": "integer"}  # type: ignore[method-assign]
    return component


# --- a live call ---------------------------------------------------------------------------
@dataclass
class Calls:
    """What every connection's handler shares."""

    service: Service | RemoteService
    limits: Limits
    connections: CallConnections | None = None  # who opened which call; closes one the app ends


class ConversationHandler(AsyncStreamHandler):
    """One WebRTC connection, an adapter: microphone -> `Session.push`; `Session.next_async` ->
    speaker; the session's state -> the page, on the call's own data channel (`web.call_page`)."""

    def __init__(self, calls: Calls) -> None:
        # Input at Opus's own 48 kHz: fastrtc then hands over each 20 ms packet as it comes (at
        # 24 kHz its resampler would hold two back: 40 ms chunks, 20 ms later); HalfRate makes 24 kHz.
        super().__init__(expected_layout="mono", output_sample_rate=SAMPLE_RATE, input_sample_rate=INPUT_RATE)
        self._half_rate = HalfRate()
        self.calls = calls
        self.session = Session(calls.limits)
        self.view = CallView(max_turns=CAPTION_TURNS)
        self.page = CallPage()
        self.owner: str | None = None
        self.call_id: str | None = None
        self._since_update = 0
        self._finished = False  # the ending was shown; the stream is closing
        self._logged = False

    def copy(self) -> ConversationHandler:
        return ConversationHandler(self.calls)

    async def start_up(self) -> None:
        self.call_id = current_connection()
        try:
            await asyncio.wait_for(self.wait_for_args(), ARGS_TIMEOUT_S)
        except TimeoutError:
            self._refuse("the page did not send the call's settings (a setting was refused?): reload the page and try again")
            return
        try:
            values = self._named_args()
            self.owner = values["owner"] if isinstance(values["owner"], str) else None
            voice, role, sampling = call_settings(values)
            inputs.flag("the mute switch", values["mute"])
            keep = inputs.flag("the keep-persona switch", values["keep_persona"])
            if self.owner:
                self.session.record_to(self.calls.service.files.recording(self.owner, self.call_id))
            await asyncio.to_thread(self.calls.service.start_call, self.session, voice, role, sampling, keep)
            logger.info("call %s: started with voice %s", self._tag, voice)
        except UserError as exc:
            self._refuse(str(exc))
        except Exception as exc:  # the handler's boundary: a fault, said on the page and logged once
            logger.exception("call %s: could not start", self._tag)
            self.session.end("error", f"the call could not start: {exc}")

    async def receive(self, frame: tuple[int, np.ndarray]) -> None:
        rate, samples = frame
        assert rate == INPUT_RATE, f"fastrtc sent {rate} Hz, the handler asked for {INPUT_RATE}"
        pcm = self._half_rate.push(int16_to_float(samples.reshape(-1)))
        self.session.push(np.zeros_like(pcm) if self._muted() else pcm)

    async def emit(self):
        if self._finished:
            await asyncio.sleep(0.05)
            return None
        out = await self.session.next_async(0.05)
        if out is not None:
            self.view.add(out)
            self._since_update += 1
            if self._since_update >= UPDATE_EVERY and self._send_update():
                self._since_update = 0
            return SAMPLE_RATE, float_to_int16(out.pcm)[None]
        if self.session.ending is not None:
            await self._finish()
        return None

    async def shutdown(self) -> None:
        """The connection closed (the user stopped, or the browser went away)."""
        self.session.end("stopped", "the call was stopped")
        await self._close_session()

    # --- endings ---------------------------------------------------------------------------
    def _refuse(self, reason: str) -> None:
        if self.session.phase is not Phase.ENDED:  # (not if the browser hung up first)
            logger.info("call %s: refused: %s", self._tag, reason[:LOGGED_CHARS])
        self.session.end("refused", reason)

    async def _finish(self) -> None:
        """The session ended on its own (time limit, idle, refusal, error): show why (the page
        then fetches what the call left), end the stream and close the connection."""
        self._finished = True
        await self._close_session()
        ending = self.session.ending
        assert ending is not None
        self._send_update(final=True)
        asyncio.get_running_loop().call_later(END_STREAM_DELAY_S, self._end_stream, ending.message)

    async def _close_session(self) -> None:
        recording = self.session.recording
        ending = await asyncio.to_thread(self.session.close)
        if ending is not None and ending.reason != "refused" and not self._logged:  # a refusal was logged already
            self._logged = True
            seconds = recording.seconds if recording is not None else self.session.elapsed_s
            logger.info("call %s: ended (%s) after %s; %s", self._tag, ending.reason, clock_text(seconds), self.session.stats)

    def _end_stream(self, message: str) -> None:
        """fastrtc's page stops the call on this message; the connection is closed after it in any case."""
        try:
            self._send("end_stream", message)
        finally:
            asyncio.get_running_loop().call_later(CLOSE_DELAY_S, lambda: asyncio.ensure_future(self._close_connection()))

    async def _close_connection(self) -> None:
        if self.calls.connections is not None:
            await self.calls.connections.close(self.call_id)  # frees the connection's place now, not after ICE gives up

    # --- what the page shows ---------------------------------------------------------------
    def _named_args(self) -> dict[str, Any]:
        """The page's values, by name (fastrtc puts the stream's inputs last, in their order)."""
        return dict(zip(CALL_INPUT_NAMES, self.latest_args[-len(CALL_INPUT_NAMES):], strict=True))

    def _muted(self) -> bool:
        """The page's mute switch, read live (fastrtc updates the values when it changes)."""
        if not isinstance(self.latest_args, list) or len(self.latest_args) < len(CALL_INPUT_NAMES):
            return False
        return self._named_args()["mute"] is True

    @property
    def _tag(self) -> str:
        return (self.call_id or "?")[:8]

    def _send_update(self, final: bool = False) -> bool:
        """The call's view to the page, if the channel is open and has taken the last ones."""
        channel = self.channel
        if channel is None or channel.readyState != "open" or (channel.bufferedAmount > MAX_BUFFERED and not final):
            return False
        now = asyncio.get_running_loop().time()
        service, connections = self.calls.service, self.calls.connections
        figures = service.figures()
        tick_ms = figures.tick_ms if figures is not None else 0.0
        if self.session.phase is Phase.LIVE:
            self.view.update_verdict(self.session.elapsed_s, self.session.stats, tick_ms)
        state = connections.state(self.call_id) if connections is not None else "closed"
        data = self.page.update(self.view, self.session, CallFigures(tick_ms, state, service.context_s), now, final)
        if self._send(MESSAGE_TYPE, data):
            self.page.sent(data, now)
            return True
        return False

    def _send(self, kind: str, data: Any) -> bool:
        channel = self.channel
        if channel is None or channel.readyState != "open":
            return False
        try:
            channel.send(call_page.encode(data) if kind == MESSAGE_TYPE else create_message(kind, data))
        except Exception as exc:  # the channel closed meanwhile: the page is gone
            logger.info("call %s: the page's channel refused a message: %s", self._tag, type(exc).__name__)
            return False
        return True


def current_connection() -> str | None:
    """The id of the WebRTC connection whose task this is (fastrtc's context), if any."""
    try:
        return get_current_context().webrtc_id
    except RuntimeError:  # not inside a connection's task
        return None


def call_files(service: Service, webrtc_value: Any, owner: Any):
    """After a call (the page asks when it stopped one, or when the server ended it): this page's
    recording of that call and its transcript, once complete; nothing for any other page."""
    call_id = getattr(webrtc_value, "webrtc_id", webrtc_value)
    recording = service.files.find(owner if isinstance(owner, str) else None, call_id if isinstance(call_id, str) else None)
    if recording is None or not recording.closed.wait(5.0) or not recording.model_frames:
        hidden = gr.update(value=None, visible=False)
        return hidden, hidden
    return gr.update(value=str(recording.wav_path), visible=True), gr.update(value=str(recording.transcript_path), visible=True)


# --- the page --------------------------------------------------------------------------------
def build_ui(service: Service | RemoteService, limits: Limits, max_sessions: int, banner: str = "") -> gr.Blocks:
    personas, default = load_personas()
    calls = Calls(service, limits)
    remote = isinstance(service, RemoteService)  # calls go to a cluster: no previews, no offline tab
    rtc, server_rtc = turn_configuration()
    low, high = CUSTOM_VOICE_SECONDS
    context_min = service.context_s / 60

    with gr.Blocks(title="PersonaPlex Live", css=call_page.style(), js=call_page.script(), theme=gr.themes.Soft(),
                   delete_cache=(600, 3600)) as demo:
        owner = gr.State(None)  # this page's token, made when the page loads; never sent to the browser
        custom_voice = gr.State("")  # this page's uploaded voice (the service's key)
        custom_heard = gr.State(None)  # that voice as the model hears it (a file), to show again
        upload_outcome = gr.State("")  # what the last clip did: the page follows it up (`show_upload`)
        gr.Markdown("# PersonaPlex Live\nTalk with NVIDIA PersonaPlex-7B: it listens while it speaks, you can interrupt, and you choose who it is and how it sounds.")
        if banner:
            gr.Markdown(banner, elem_id="banner")
        if remote:
            gr.Markdown("Calls from this page go to an engine cluster. Voice previews and the offline tab need a "
                        "model on this server, so they are not shown.", elem_id="remote_note")
        status = gr.Markdown(status_markdown(service), elem_id="status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=340):
                with gr.Tab("Live conversation"):
                    summary = gr.HTML(persona_summary(default, personas[default].get("voice", "NATF2")), elem_id="summary")
                    webrtc = WebRTC(label="Call", modality="audio", mode="send-receive", full_screen=False,
                                    button_labels={"start": "Start the call", "stop": "End the call", "waiting": "Connecting…"},
                                    rtc_configuration=rtc, server_rtc_configuration=server_rtc, elem_id="webrtc")
                    # Drawn by the page's script from the call's own messages (web/call_page.py), never by Gradio.
                    gr.HTML(f"<div data-pp='live'>{idle_html()}</div>", elem_id="live")
                    gr.HTML("<div class='turns-title'>Conversation</div><div data-pp='conversation' class='turns'>"
                            "<p class='placeholder'>The conversation shows here, turn by turn.</p></div>", elem_id="conversation")
                    mute = gr.Checkbox(False, label="Mute my microphone (the model hears silence)", elem_id="mute")
                    with gr.Row():
                        recording = gr.File(label="Recording (stereo: you left, model right)", elem_id="recording", visible=False)
                        transcript_file = gr.File(label="Transcript", elem_id="transcript_file", visible=False)
                    with gr.Accordion("Call details", open=False):
                        gr.HTML("<div data-pp='details'></div>", elem_id="details")
                    files_trigger = gr.Button("the call's files", elem_id="call_files", elem_classes="pp-hidden")
                    gr.Markdown("Headphones avoid echo. The model hears you while it talks: interrupt it any time.",
                                elem_classes="hint")
                with gr.Tab("Offline", visible=not remote):
                    gr.Markdown("No WebRTC needed: give the user's side of a conversation, get the model's side back.")
                    offline_in = gr.Audio(sources=["upload", "microphone"], type="filepath", label="User side", elem_id="offline_in")
                    offline_run = gr.Button("Generate the model's side", variant="primary", elem_id="offline_run")
                    offline_agent = gr.Audio(label="Model's side", type="filepath", elem_id="offline_agent")
                    offline_mix = gr.Audio(label="Both sides (stereo)", type="filepath", elem_id="offline_mix")
                    offline_text = gr.Textbox(label="The conversation", lines=4, interactive=False, elem_id="offline_text")
                    offline_files = gr.File(label="Downloads", file_count="multiple", elem_id="offline_files")
            with gr.Column(scale=2, min_width=300, elem_id="settings"):
                gr.HTML("<p class='in-call-note'>This call keeps the persona, voice and settings it started with: "
                        "end it to change them for the next one.</p>", elem_id="settings_note")
                persona = gr.Dropdown(list(personas), value=default, label="Persona", elem_id="persona")
                role = gr.Textbox(personas[default]["prompt"], label="Role prompt", lines=4, elem_id="role",
                                  info="Who the model is and what it knows. May be empty.")
                role_count = gr.Markdown(role_counter(personas[default]["prompt"]), elem_id="role_count")
                voice = gr.Dropdown(voice_choices(RELEASE_VOICES), value=personas[default].get("voice", "NATF2"), label="Voice",
                                    elem_id="voice", allow_custom_value=True)  # the checkpoint's list arrives after loading
                with gr.Row():
                    preview = gr.Button("▶ Hear this voice", size="sm", elem_id="preview", visible=not remote)
                preview_audio = gr.Audio(label="The model greeting you in this voice", type="filepath", autoplay=True,
                                         visible=False, elem_id="preview_audio", interactive=False)
                with gr.Accordion("Custom voice", open=False, elem_id="custom_voice"):
                    gr.Markdown(f"Upload or record {low:g} to {high:g} s of clean speech (wav, flac, mp3, ogg...). Only use a "
                                "voice you own or have permission to use; do not impersonate anyone.")
                    consent = gr.Checkbox(False, label="I have the right to use this voice", elem_id="consent")
                    clip = gr.Audio(sources=["upload", "microphone"], type="filepath", label=f"Voice clip ({low:g} to {high:g} s)",
                                    elem_id="voice_clip")
                    voice_status = gr.Markdown("", elem_id="voice_status", label="Message")
                    voice_in_use = gr.Audio(label="Your voice, as the model hears it", type="filepath", visible=False,
                                            interactive=False, elem_id="voice_in_use")
                with gr.Accordion("Sampling and memory (advanced)", open=False):
                    defaults = SamplingParams()
                    temp_text = as_sent(gr.Slider(0.0, 1.5, defaults.temp_text, step=0.05, label="Text temperature", elem_id="temp_text"))
                    topk_text = whole_number(as_sent(gr.Slider(1, MAX_TOP_K["text"], defaults.topk_text, step=1, label="Text top-k", elem_id="topk_text")))
                    temp_audio = as_sent(gr.Slider(0.0, 1.5, defaults.temp_audio, step=0.05, label="Audio temperature", elem_id="temp_audio"))
                    topk_audio = whole_number(as_sent(gr.Slider(1, MAX_TOP_K["audio"], defaults.topk_audio, step=1, label="Audio top-k", elem_id="topk_audio")))
                    seed = as_sent(gr.Number(inputs.RANDOM_SEED, precision=0, minimum=inputs.RANDOM_SEED, maximum=SEED_MAX,
                                             label=f"Seed (-1: random; 0 to {SEED_MAX})", elem_id="seed"))
                    greedy = gr.Checkbox(False, label="Greedy decoding", elem_id="greedy")
                    keep_persona = gr.Checkbox(True, label=f"Keep the persona past {context_min:g} minutes (the model "
                                               "forgets the oldest conversation instead)", elem_id="keep_persona")

        sampling = [temp_text, topk_text, temp_audio, topk_audio, seed, greedy]
        call_inputs = {"owner": owner, "role": role, "voice": voice, "custom_voice": custom_voice, "consent": consent,
                       **dict(zip(SAMPLING_NAMES, sampling, strict=True)), "mute": mute, "keep_persona": keep_persona}
        assert tuple(call_inputs) == CALL_INPUT_NAMES
        calls.connections = CallConnections(webrtc)
        calls.connections.install()  # before `stream`: its events go through these doors
        demo.load(new_owner, outputs=owner)
        persona.change(functools.partial(pick_persona, service, personas), inputs=[persona, voice], outputs=[role, voice])
        gr.on([persona.change, voice.change], persona_summary, inputs=[persona, voice], outputs=summary, show_progress="hidden")
        role.change(role_counter, inputs=role, outputs=role_count, show_progress="hidden")
        voice.change(lambda: gr.update(visible=False, value=None), outputs=preview_audio, show_progress="hidden")
        preview.click(functools.partial(preview_voice, service), inputs=[voice, custom_voice], outputs=preview_audio,
                      api_name="preview_voice", concurrency_limit=PREVIEWS_AT_ONCE).success(
            lambda: gr.update(visible=True), outputs=preview_audio, show_progress="hidden")

        def upload(voice_clip: Any, consent: Any, custom_voice: Any, heard: Any, request: gr.Request) -> Upload:
            """A voice clip (5 to 30 s of speech) becomes this session's custom voice, once `consent` is true."""
            return upload_voice(service, voice_clip, consent, custom_voice, heard, request.session_hash)

        upload_args = {"inputs": [clip, consent, custom_voice, custom_heard],
                       "outputs": [voice_status, voice_in_use, custom_voice, custom_heard, upload_outcome]}
        shown = {"inputs": upload_outcome, "outputs": [voice, clip, voice_in_use], "show_progress": "hidden"}
        clip.upload(upload, api_name="upload_voice", **upload_args).then(show_upload, **shown)
        clip.stop_recording(upload, **upload_args).then(show_upload, **shown)
        consent.change(upload, **upload_args).then(show_upload, **shown)  # ticked after the upload: the clip applies now
        webrtc.stream(ConversationHandler(calls), inputs=[webrtc, *call_inputs.values()], outputs=[webrtc],
                      concurrency_limit=max_sessions + MAX_OPENING + SPARE_CONNECTIONS)
        webrtc.start_recording(lambda: (gr.update(visible=False), gr.update(visible=False)), outputs=[recording, transcript_file])
        files = {"inputs": [webrtc, owner], "outputs": [recording, transcript_file], "show_progress": "hidden"}
        webrtc.stop_recording(functools.partial(call_files, service), **files)  # the page stopped the call
        files_trigger.click(functools.partial(call_files, service), **files)  # the server ended it (web/call_page.js)
        offline_run.click(check_offline_input, inputs=offline_in, outputs=None).success(
            functools.partial(generate_offline, service), inputs=[offline_in, role, voice, custom_voice, consent, *sampling],
            outputs=[offline_agent, offline_mix, offline_text, offline_files], api_name="generate_offline",
            concurrency_limit=offline_runs(max_sessions))  # the rest wait in Gradio's queue, and the page says so

        def voices() -> list[VoiceInfo]:
            """The voices of the loaded checkpoint: `name` (what `voice` takes) and `label` (what it sounds like)."""
            return list_voices(service)

        def persona_presets() -> list[PersonaInfo]:
            """The page's persona presets: `name`, `prompt` (the role prompt) and `voice` (suggested)."""
            return list_personas(personas)

        api_endpoint(demo, voices, "voices")
        api_endpoint(demo, persona_presets, "personas")
        gr.Timer(STATUS_EVERY_S).tick(functools.partial(status_markdown, service), outputs=status, show_progress="hidden")
        voices_timer = gr.Timer(STATUS_EVERY_S, active=not service.status.ready)
        voices_timer.tick(functools.partial(checkpoint_voices, service), inputs=voice, outputs=[voice, voices_timer],
                          show_progress="hidden")
        hide_internal_events(demo)
    service.when_ready(functools.partial(publish_checkpoint_voices, demo, voice, summary, persona, voices_timer, service))
    return demo


def publish_checkpoint_voices(demo: gr.Blocks, voice: gr.Dropdown, summary: gr.HTML, persona: gr.Dropdown,
                              timer: gr.Timer, service: Service) -> None:
    """Once loaded, the voice list (of pages opened from now on, and of the API) is the checkpoint's,
    and those pages wait for no list (`timer` off). Gradio computes its page config and API
    description once; both are refreshed here."""
    timer.active = False
    names = service.voice_names()
    voice.choices = voice_choices(names)
    if voice.value not in names:
        voice.value = names[0]
    summary.value = persona_summary(persona.value, voice.value)
    demo.config = demo.get_config_file()
    server = getattr(demo, "server_app", None)
    if server is not None:
        server.api_info = server.all_app_info = None


def api_endpoint(demo: gr.Blocks, fn: Callable[[], Any], api_name: str) -> None:
    """`fn` as an API endpoint whose return is typed and named: Gradio reads the types from the
    signature (here written as strings: they are resolved first) and names a return by its place."""
    fn.__annotations__ = typing.get_type_hints(fn)
    gr.api(fn, api_name=api_name)
    (endpoint,) = [f for f in demo.fns.values() if f.api_name == api_name]
    endpoint.outputs[0].label = api_name


def hide_internal_events(demo: gr.Blocks) -> None:
    """Only what a person would call is in the API page (`PUBLIC_API`): the page's own events,
    and those fastrtc adds for every input of the stream, stay callable but are not listed."""
    for fn in demo.fns.values():
        if fn.api_name not in PUBLIC_API:
            fn.show_api = False


def status_markdown(service: Service | RemoteService) -> str:
    """The engine now (`Service.summary`), with a coloured dot."""
    summary = service.summary()
    text = f"<span class='dot {summary.level}'></span> **{summary.title}**: {html.escape(summary.text, quote=False)}"
    if service.status.state is State.FAILED:
        text += "\n\nFix the problem above and restart the app. The offline tab and live calls need the model."
    return text


def checkpoint_voices(service: Service, current: Any):
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


def pick_persona(service: Service, personas: dict[str, dict], name: Any, current: Any):
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
def preview_voice(service: Service, voice: Any, custom_voice: Any = "") -> str:
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
def upload_voice(service: Service, voice_clip: Any, consent: Any, custom_voice: Any = "", heard: Any = None,
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


def list_voices(service: Service) -> list[VoiceInfo]:
    """The voices of the loaded checkpoint: name (what `voice` takes) and what it sounds like."""
    return [VoiceInfo(name=n, label=voice_label(n)) for n in service.voice_names()]


def list_personas(personas: dict[str, dict]) -> list[PersonaInfo]:
    """The page's persona presets: name, role prompt and suggested voice."""
    return [PersonaInfo(name=n, prompt=p["prompt"], voice=p.get("voice", "")) for n, p in personas.items()]


def check_offline_input(user_audio: Any) -> None:
    if not user_audio or not isinstance(user_audio, str):
        raise gr.Error("Upload or record the user's side first.", print_exception=False)


def offline_files(service: Service, user: np.ndarray, agent: np.ndarray, transcript: str) -> list[str]:
    """The offline run's downloads, in a folder of the service's file store (deleted after a while)."""
    folder = service.files.folder()
    contents = {"model.wav": wav_bytes(agent), "both.wav": wav_bytes(np.stack([user, agent], axis=1)),
                "transcript.txt": (transcript or "(nobody said anything)\n").encode()}
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    return [str(folder / name) for name in contents]


@spaces.GPU(duration=120)
@in_words
def generate_offline(service: Service, user_audio: Any, role_prompt: Any, voice: Any, custom_voice: Any, consent: Any,
                     text_temperature: Any, text_top_k: Any, audio_temperature: Any, audio_top_k: Any, seed: Any, greedy: Any,
                     progress=gr.Progress()):  # noqa: B008 (Gradio reads it from the signature)
    """The model's side of a recorded conversation: its audio (as long as the input), a stereo mix of
    both sides, the conversation as text, and the three files."""
    check_offline_input(user_audio)
    values = {"role": role_prompt, "voice": voice, "custom_voice": custom_voice, "consent": consent}
    sampling = (text_temperature, text_top_k, audio_temperature, audio_top_k, seed, greedy)
    voice, role, params = call_settings({**values, **dict(zip(SAMPLING_NAMES, sampling, strict=True))})
    pcm = read_audio(user_audio, max_seconds=600)
    result = service.run_offline(voice, role, params, pcm, lambda done, total: progress(done / total, desc="generating"),
                                 waiting=lambda text: progress(0.0, desc=text))
    text = result.transcript.render()
    files = offline_files(service, result.user, result.agent, text)
    return files[0], files[1], text, files


def turn_configuration():
    """TURN through fastrtc's Cloudflare helper on a Space (HF_TOKEN); none locally."""
    if not os.environ.get("SPACE_ID"):
        return None, None
    from fastrtc import get_cloudflare_turn_credentials, get_cloudflare_turn_credentials_async

    async def browser_credentials():
        return await get_cloudflare_turn_credentials_async()

    try:
        server = get_cloudflare_turn_credentials(ttl=360_000)
    except Exception as exc:  # the page must come up anyway; calls may then fail to connect
        logger.warning("no TURN credentials for the server (set the HF_TOKEN secret): %s", exc)
        server = None
    return browser_credentials, server


def keep_compiled_kernels() -> None:
    """On a Space with persistent storage (mounted at /data), Inductor's cache of compiled kernels
    lives there, so that a restart does not compile the engine from nothing again."""
    if os.environ.get("SPACE_ID") and os.access("/data", os.W_OK):
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", "/data/torchinductor")


def model_settings(args: argparse.Namespace) -> tuple[Settings, str]:
    """The model to load, and a banner for the page ("": none): the tiny test model when no model
    was named and there is no CUDA GPU (`on_the_tiny_model`), so that a laptop gets a working page."""
    asked = Settings(args.checkpoint, args.hf_repo, args.config, args.device, args.max_sessions)
    tiny = on_the_tiny_model(asked, TINY_CHECKPOINT)
    if tiny is None:
        return asked, ""
    logger.info("no CUDA GPU: the page runs on the tiny test model in %s", TINY_CHECKPOINT)
    return tiny, TINY_BANNER


def env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"PERSONAPLEX_{name}", default)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    on_space = bool(os.environ.get("SPACE_ID"))
    p = argparse.ArgumentParser(description="PersonaPlex Live: the web demo")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0" if on_space else "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    p.add_argument("--share", action="store_true", default=env("SHARE") == "1", help="a public gradio.live link")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default=env("CHECKPOINT"), help="local folder with the release files")
    source.add_argument("--hf-repo", default=env("HF_REPO"), help="hub repo (default nvidia/personaplex-7b-v1)")
    p.add_argument("--config", default=env("CONFIG"), help="model hyper-parameters as JSON (default: the 7B release)")
    p.add_argument("--device", default=env("DEVICE"), choices=[None, "cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--max-sessions", type=int, default=int(env("MAX_SESSIONS", "0")) or None,
                   help="concurrent conversations (default: what fits the device's memory)")
    p.add_argument("--time-limit", type=float, default=float(env("TIME_LIMIT", "600")), help="seconds per call (0: none)")
    p.add_argument("--idle-timeout", type=float, default=float(env("IDLE_TIMEOUT", str(REALTIME.idle_timeout_s))),
                   help="seconds without audio from the caller before a call is closed")
    p.add_argument("--engine-url", default=env("ENGINE_URL"),
                   help="run no model here: send every call to the engine cluster at ws://HOST:PORT/api/chat")
    p.add_argument("--ssl-certfile", help="serve https and wss with this certificate (NVIDIA's web client needs wss)")
    p.add_argument("--ssl-keyfile", help="the certificate's key")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("aioice").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="The '(theme|css|js)' parameter in the Blocks constructor")
    warnings.filterwarnings("ignore", message="The 'show_copy_all_button' parameter")  # Gradio 6 renames these
    warnings.filterwarnings("ignore", message="The 'show_api' parameter in event listeners")  # Gradio 6 renames it
    args = parse_args(argv)
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise SystemExit("give both --ssl-certfile and --ssl-keyfile, or neither")
    keep_compiled_kernels()
    os.umask(0o077)  # what the app writes (recordings, uploads, Gradio's copies) is its own: folders 0700, files 0600
    if args.engine_url:  # no model here: every call goes to the cluster (personaplex.cluster)
        service, banner = RemoteService(args.engine_url), ""
    else:
        settings, banner = model_settings(args)
        service = Service(settings)
    # A stopped server ends its calls, stops the engine thread (exiting under a running torch op
    # aborts the process) and deletes its files on the way out.
    signal.signal(signal.SIGTERM, lambda *_: (service.stop(), sys.exit(0)))
    service.start()
    limits = Limits(time_limit_s=args.time_limit or None, idle_timeout_s=args.idle_timeout)
    demo = build_ui(service, limits, args.max_sessions or 64, banner)
    demo.queue(default_concurrency_limit=8)
    forget_finished_events(demo)
    explain_refusals(demo)
    quiet_component_server()
    doors = Middleware(RequestLimits, limits=RequestSizes(trust_proxy=bool(os.environ.get("SPACE_ID"))),
                       upload_dir=lambda: Path(gradio_upload_folder()))
    personas, default = load_personas()
    routes = [] if args.engine_url else [  # (in front of a cluster, its own /api/chat is the door)
        WebSocketRoute(api_chat.PATH, api_chat.ChatDoor(service, limits, personas[default].get("voice", "NATF2")).serve)]
    demo.launch(
        server_name=args.host, server_port=args.port, share=args.share, max_file_size="100mb", quiet=True,
        prevent_thread_lock=True, state_session_capacity=SESSIONS_KEPT,
        ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile, ssl_verify=not args.ssl_certfile,
        app_kwargs={"middleware": [doors], "routes": routes},  # the WebSocket protocol beside the page
    )
    logger.info("%s: open %s in a browser", PAGE_UP, demo.local_url)
    if args.share:
        logger.info("public link: %s", demo.share_url or "none (Gradio could not make one; see above)")
    else:
        logger.info("for a public link, start it with --share (or PERSONAPLEX_SHARE=1)")
    demo.block_thread()


if __name__ == "__main__":
    main()
