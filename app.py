"""PersonaPlex Live: talk with PersonaPlex-7B in the browser (Gradio 5 + fastrtc WebRTC).

UI only. The page is built at once; the model loads in the background (`personaplex.service`)
and a status line says what the engine is doing. A live call is a `personaplex.session.Session`,
which owns the conversation's timeline; the fastrtc handler here passes audio in and out and
turns the session into what the page shows: who is speaking, the conversation turn by turn,
whether the call keeps real time. Everything a call leaves belongs to the browser session that
made it: a per-page token kept on the server (`gr.State`) is checked before captions or files
are shown. A second tab runs the same engine on a recording. The API lists only what a person
would call (`PUBLIC_API`), with parameter names that say what they are.
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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import spaces
from fastrtc import AdditionalOutputs, AsyncStreamHandler, WebRTC
from fastrtc.utils import create_message, get_current_context

from personaplex import inputs
from personaplex.audio import AudioError, HalfRate, float_to_int16, int16_to_float, read_audio, wav_bytes
from personaplex.config import FRAME_RATE, SAMPLE_RATE
from personaplex.errors import SettingsError, UserError
from personaplex.health import BEHIND_TICK_MS, CallView, Memory, Verdict, memory
from personaplex.sampling import MAX_TOP_K, SEED_MAX, SamplingParams
from personaplex.service import CUSTOM_VOICE_SECONDS, MAX_ROLE_CHARS, Service, Settings, State
from personaplex.session import REALTIME, Limits, Phase, Session
from personaplex.transcript import FRAME_S, MODEL, Transcript, clock_text

logger = logging.getLogger("personaplex.app")

ASSETS = Path(__file__).parent / "assets"
RELEASE_VOICES = [f"NAT{g}{i}" for g in "FM" for i in range(4)] + [f"VAR{g}{i}" for g in "FM" for i in range(5)]
CUSTOM_VOICE = "Custom voice (uploaded)"
UPDATE_EVERY = 3  # frames between page updates (about 4 a second: who is speaking stays live)
MAX_PENDING_UPDATES = 2  # updates not sent yet beyond which a new one is skipped (the next carries it all)
ARGS_TIMEOUT_S = 3.0  # the page sends a call's settings within this time of connecting, or the call ends
END_STREAM_DELAY_S = 0.3  # the last captions and files reach the page before the call is closed
CLOSE_DELAY_S = 0.5  # then the browser closes its side; the server closes its own after this
CAPTION_TURNS = 20  # turns shown live (the transcript file has them all)
DETAILS_EVERY_S = 1.0  # the call's figures change slowly: sent once a second
CAPTION_CHARS = 1500  # of a turn shown live: its end
STATUS_EVERY_S = 2.0
INPUT_RATE = 2 * SAMPLE_RATE  # the microphone as fastrtc decodes it (Opus: 48 kHz)
SAMPLING_NAMES = ("temp_text", "topk_text", "temp_audio", "topk_audio", "seed", "greedy")
CALL_INPUT_NAMES = ("owner", "role", "voice", "custom_voice", "consent", *SAMPLING_NAMES, "mute", "keep_persona")  # what a call reads
PAGE_UP = "the page is up"  # logged with its address once the server listens
PUBLIC_API = ("generate_offline", "upload_voice", "preview_voice", "voices", "personas")


def load_personas() -> tuple[dict[str, dict], str]:
    raw = json.loads((ASSETS / "personas.json").read_text())
    return {p["name"]: p for p in raw["personas"]}, raw["default"]


def new_owner() -> str:
    """A page session's token: what it made can be fetched with it, and with nothing else."""
    return secrets.token_urlsafe(24)


def same_owner(a: Any, b: Any) -> bool:
    return isinstance(a, str) and isinstance(b, str) and bool(a) and secrets.compare_digest(a, b)


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
    voice = inputs.text("the voice", voice, empty_if_none=False)
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


# --- a live call ---------------------------------------------------------------------------
@dataclass(frozen=True)
class CallUpdate:
    """What the page shows of a call, for the page session `owner` only."""

    owner: str | None
    live: str  # html: who is speaking, and the verdict
    conversation: list[dict] | None  # chat messages, turn by turn (None: as last sent)
    details: str | None  # html: the figures (None: as last sent)
    files: tuple[str, str] | None = None  # after the call: the recording and the transcript


@dataclass
class Calls:
    """What every connection's handler shares."""

    service: Service
    limits: Limits
    connections: WebRTC | None = None  # fastrtc's peer connections, to close one the app ends


class ConversationHandler(AsyncStreamHandler):
    """One WebRTC connection, an adapter: microphone -> `Session.push`; `Session.next_async` ->
    speaker; the session's state -> what the page shows."""

    def __init__(self, calls: Calls) -> None:
        # Input at Opus's own 48 kHz: fastrtc then hands over each 20 ms packet as it comes (at
        # 24 kHz its resampler would hold two back: 40 ms chunks, 20 ms later); HalfRate makes 24 kHz.
        super().__init__(expected_layout="mono", output_sample_rate=SAMPLE_RATE, input_sample_rate=INPUT_RATE)
        self._half_rate = HalfRate()
        self.calls = calls
        self.session = Session(calls.limits)
        self.view = CallView(max_turns=CAPTION_TURNS)
        self.owner: str | None = None
        self.call_id: str | None = None
        self._since_update = 0
        self._sent_messages: list[dict] | None = None
        self._details_at = -float("inf")
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
            audio = (SAMPLE_RATE, float_to_int16(out.pcm)[None])
            self._since_update += 1
            if self._since_update >= UPDATE_EVERY and self._channel_open() and self._pending_updates() < MAX_PENDING_UPDATES:
                self._since_update = 0
                return audio, AdditionalOutputs(self._update())
            return audio
        if self.session.ending is not None:
            return await self._finish()
        return None

    async def shutdown(self) -> None:
        """The connection closed (the user stopped, or the browser went away)."""
        self.session.end("stopped", "the call was stopped")
        await self._close_session()

    # --- endings ---------------------------------------------------------------------------
    def _refuse(self, reason: str) -> None:
        if self.session.phase is not Phase.ENDED:  # (not if the browser hung up first)
            logger.info("call %s: refused: %s", self._tag, reason)
        self.session.end("refused", reason)

    async def _finish(self) -> AdditionalOutputs | None:
        """The session ended on its own (time limit, idle, refusal, error): show why and what
        it left, then end the stream and close the connection."""
        self._finished = True
        await self._close_session()
        ending = self.session.ending
        assert ending is not None
        asyncio.get_running_loop().call_later(END_STREAM_DELAY_S, self._end_stream, ending.message)
        return AdditionalOutputs(self._update(final=True)) if self._channel_open() else None

    async def _close_session(self) -> None:
        recording = self.session.recording
        ending = await asyncio.to_thread(self.session.close)
        if ending is not None and ending.reason != "refused" and not self._logged:  # a refusal was logged already
            self._logged = True
            seconds = recording.seconds if recording is not None else self.session.elapsed_s
            logger.info("call %s: ended (%s) after %s; %s", self._tag, ending.reason, clock_text(seconds), self.session.stats)

    def _channel_open(self) -> bool:
        """Updates travel on the data channel: none once the browser has closed it."""
        return self.channel is not None and self.channel.readyState == "open"

    def _end_stream(self, message: str) -> None:
        channel = self.channel
        if channel is not None and self._channel_open():
            channel.send(create_message("end_stream", message))  # the page stops the call and shows why
        asyncio.get_running_loop().call_later(CLOSE_DELAY_S, lambda: asyncio.ensure_future(self._close_connection()))

    async def _close_connection(self) -> None:
        pc = self._connection()
        if pc is not None:
            await pc.close()  # frees fastrtc's connection slot now, not after ICE gives up

    # --- what the page shows ---------------------------------------------------------------
    def _named_args(self) -> dict[str, Any]:
        """The page's values, by name (fastrtc puts the stream's inputs last, in their order)."""
        return dict(zip(CALL_INPUT_NAMES, self.latest_args[-len(CALL_INPUT_NAMES):], strict=True))

    def _muted(self) -> bool:
        """The page's mute switch, read live (fastrtc updates the values when it changes)."""
        if not isinstance(self.latest_args, list) or len(self.latest_args) < len(CALL_INPUT_NAMES):
            return False
        return self._named_args()["mute"] is True

    def _pending_updates(self) -> int:
        """Page updates fastrtc holds for this call that Gradio has not sent yet (its queue is
        unbounded: when the server falls behind, each update would otherwise pile up)."""
        connections = self.calls.connections
        queue = connections.additional_outputs.get(self.call_id) if connections is not None and self.call_id else None
        return queue.queue.qsize() if queue is not None else 0

    def _connection(self):  # -> aiortc.RTCPeerConnection | None
        connections = self.calls.connections
        return connections.pcs.get(self.call_id) if connections is not None and self.call_id else None

    @property
    def _tag(self) -> str:
        return (self.call_id or "?")[:8]

    def _update(self, final: bool = False) -> CallUpdate:
        session, view = self.session, self.view
        worker = self.calls.service.worker
        tick_ms = worker.last_tick_ms if worker is not None else 0.0
        if session.phase is Phase.LIVE:
            view.update_verdict(session.elapsed_s, session.stats, tick_ms)
        files = None
        recording = session.recording
        if final and recording is not None and recording.closed.is_set() and recording.model_frames:
            files = (str(recording.wav_path), str(recording.transcript_path))
        # Only what changed goes to the page: Gradio re-validates a chat's every message at each
        # update, work that shares the interpreter with the engine thread.
        messages = conversation_messages(view.captions)
        conversation = messages if final or messages != self._sent_messages else None
        self._sent_messages = messages
        details = None
        now = asyncio.get_running_loop().time()
        if final or now - self._details_at >= DETAILS_EVERY_S:
            pc = self._connection()
            details = details_html(session, tick_ms, pc.connectionState if pc is not None else "closed",
                                   call_memory(session, self.calls.service).held)
            self._details_at = now
        return CallUpdate(self.owner, live_html(view, session, self.calls.service), conversation, details, files)


def current_connection() -> str | None:
    """The id of the WebRTC connection whose task this is (fastrtc's context), if any."""
    try:
        return get_current_context().webrtc_id
    except RuntimeError:  # not inside a connection's task
        return None


# --- how a call looks ------------------------------------------------------------------------
VERDICT_CLASS = {Verdict.REAL_TIME: "ok", Verdict.BEHIND: "behind", Verdict.DROPPING: "dropping"}
PHASE_TEXT = {Phase.WAITING: "connecting", Phase.STARTING: "loading the persona", Phase.LIVE: "live", Phase.ENDED: "ended"}


def live_html(view: CallView, session: Session, service: Service) -> str:
    """Who is speaking (two meters), the verdict, and why the call ended or what to mind."""
    rows = "".join(
        f"<div class='who {'speaking' if a.speaking else ''}'><span class='name'>{name}</span>"
        f"<span class='meter'><i style='width:{100 * a.fraction:.0f}%'></i></span>"
        f"<span class='state'>{'speaking' if a.speaking else 'quiet'}</span></div>"
        for name, a in (("You", view.user), ("Model", view.model))
    )
    if session.phase is not Phase.LIVE or view.verdict is None:
        verdict = f"<div class='verdict waiting'>{PHASE_TEXT[session.phase]}</div>"
    else:
        verdict = f"<div class='verdict {VERDICT_CLASS[view.verdict]}'>{view.verdict.value}</div>"
    note, reason = "", session.ending.reason if session.ending is not None else ""
    if session.ending is not None:
        note = f"<p class='warn'>⚠ {html.escape(session.ending.message, quote=False)}</p>"
    elif session.phase is Phase.LIVE and (warning := call_memory(session, service).warning):
        note = f"<p class='warn'>⚠ {warning}</p>"
    return f"<div class='live' data-ending='{reason}'><div class='meters'>{rows}</div>{verdict}{note}</div>"


def call_memory(session: Session, service: Service) -> Memory:
    return memory(service.config.lm.context / FRAME_RATE, session.prompt_frames / FRAME_RATE,
                  session.stats.frames_in * FRAME_S, session.keeps_persona)


def details_html(session: Session, tick_ms: float, connection: str, held: str = "") -> str:
    """The figures behind the verdict; `held`: what the model's memory holds (`call_memory`)."""
    s, limit = session.stats, session.limits.time_limit_s
    heard = max(1, s.frames_in + s.too_fast)
    rows = [
        ("connection", f"{connection}; the call is {PHASE_TEXT[session.phase]}"),
        ("engine tick", f"{tick_ms:.1f} ms for an 80 ms frame (real-time factor {tick_ms / 80:.2f})"
                        + (" — near its limit" if tick_ms > BEHIND_TICK_MS else "")),
        ("your audio dropped", f"{s.too_fast + s.unheard} of {heard} frames ({100 * (s.too_fast + s.unheard) / heard:.1f} %)"),
        ("the model's audio dropped", f"{s.silent_out + s.dropped_out} frames answered with silence or not taken"),
        ("call time", clock_text(session.elapsed_s) + (f" of {clock_text(limit)}" if limit else "")),
    ]
    if held and session.phase is Phase.LIVE:
        rows.append(("the model's memory", held))
    cells = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)
    return f"<table class='details'>{cells}</table>"


def conversation_messages(transcript: Transcript) -> list[dict]:
    """The turns as chat messages: the model's words, and when you spoke (escaped: the chat box
    reads its messages as html, and would swallow a "<" the model says)."""
    return [{"role": "assistant" if t.speaker == MODEL else "user", "content": html.escape(
             f"{clock_text(t.start_s)} · {_tail(t.render(), CAPTION_CHARS)}", quote=False)} for t in transcript.turns()]


def _tail(text: str, chars: int) -> str:
    """The end of a long turn (a monologue), so that every page update stays small."""
    return text if len(text) <= chars else "…" + text[-chars:].lstrip()


def show_update(owner: Any, update: Any):
    """The page's view of a call update: only for the page session that made the call."""
    keep = gr.update()
    if not isinstance(update, CallUpdate) or not same_owner(owner, update.owner):
        return keep, keep, keep, keep, keep
    files = update.files
    recording = gr.update(value=files[0], visible=True) if files else keep
    transcript = gr.update(value=files[1], visible=True) if files else keep
    conversation = keep if update.conversation is None else update.conversation
    details = keep if update.details is None else update.details
    return update.live, conversation, details, recording, transcript


def stopped_call_files(service: Service, webrtc_value: Any, owner: Any):
    """After the user pressed stop: this page's recording of that call, once it is complete."""
    call_id = getattr(webrtc_value, "webrtc_id", webrtc_value)
    recording = service.files.find(owner if isinstance(owner, str) else None, call_id if isinstance(call_id, str) else None)
    if recording is None or not recording.closed.wait(5.0) or not recording.model_frames:
        hidden = gr.update(value=None, visible=False)
        return hidden, hidden
    return gr.update(value=str(recording.wav_path), visible=True), gr.update(value=str(recording.transcript_path), visible=True)


# --- the page --------------------------------------------------------------------------------
def build_ui(service: Service, limits: Limits, max_sessions: int) -> gr.Blocks:
    personas, default = load_personas()
    calls = Calls(service, limits)
    rtc, server_rtc = turn_configuration()
    low, high = CUSTOM_VOICE_SECONDS
    context_min = service.config.lm.context / FRAME_RATE / 60

    with gr.Blocks(title="PersonaPlex Live", css=CSS, js=ONE_CLICK_START, theme=gr.themes.Soft(), delete_cache=(600, 3600)) as demo:
        owner = gr.State(None)  # this page's token, made when the page loads; never sent to the browser
        custom_voice = gr.State("")  # this page's uploaded voice (the service's key)
        shown_voices = gr.State(None)  # the voice list this page shows (it changes once, after loading)
        gr.Markdown("# PersonaPlex Live\nTalk with NVIDIA PersonaPlex-7B: it listens while it speaks, you can interrupt, and you choose who it is and how it sounds.")
        status = gr.Markdown(status_markdown(service), elem_id="status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=340):
                with gr.Tab("Live conversation"):
                    webrtc = WebRTC(label="Call", modality="audio", mode="send-receive", full_screen=False,
                                    button_labels={"start": "Start the call", "stop": "End the call", "waiting": "Connecting…"},
                                    rtc_configuration=rtc, server_rtc_configuration=server_rtc, elem_id="webrtc")
                    live = gr.HTML(idle_html(), elem_id="live")
                    conversation = gr.Chatbot(type="messages", label="Conversation", elem_id="conversation", height=300,
                                              render_markdown=False, allow_tags=False, show_copy_all_button=True, placeholder="The conversation shows here, turn by turn.")
                    mute = gr.Checkbox(False, label="Mute my microphone (the model hears silence)", elem_id="mute")
                    with gr.Row():
                        recording = gr.File(label="Recording (stereo: you left, model right)", elem_id="recording", visible=False)
                        transcript_file = gr.File(label="Transcript", elem_id="transcript_file", visible=False)
                    with gr.Accordion("Call details", open=False):
                        details = gr.HTML("", elem_id="details")
                    gr.Markdown("Headphones avoid echo. The model hears you while it talks: interrupt it any time.",
                                elem_classes="hint")
                with gr.Tab("Offline"):
                    gr.Markdown("No WebRTC needed: give the user's side of a conversation, get the model's side back.")
                    offline_in = gr.Audio(sources=["upload", "microphone"], type="filepath", label="User side", elem_id="offline_in")
                    offline_run = gr.Button("Generate the model's side", variant="primary", elem_id="offline_run")
                    offline_agent = gr.Audio(label="Model's side", type="filepath", elem_id="offline_agent")
                    offline_mix = gr.Audio(label="Both sides (stereo)", type="filepath", elem_id="offline_mix")
                    offline_text = gr.Textbox(label="The conversation", lines=4, interactive=False, elem_id="offline_text")
                    offline_files = gr.File(label="Downloads", file_count="multiple", elem_id="offline_files")
            with gr.Column(scale=2, min_width=300):
                persona = gr.Dropdown(list(personas), value=default, label="Persona", elem_id="persona")
                role = gr.Textbox(personas[default]["prompt"], label="Role prompt", lines=4, elem_id="role",
                                  info="Who the model is and what it knows. May be empty.")
                role_count = gr.Markdown(role_counter(personas[default]["prompt"]), elem_id="role_count")
                voice = gr.Dropdown(voice_choices(RELEASE_VOICES), value=personas[default].get("voice", "NATF2"), label="Voice",
                                    elem_id="voice", allow_custom_value=True)  # the checkpoint's list arrives after loading
                with gr.Row():
                    preview = gr.Button("▶ Hear this voice", size="sm", elem_id="preview")
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
                    topk_text = as_sent(gr.Slider(1, MAX_TOP_K["text"], defaults.topk_text, step=1, label="Text top-k", elem_id="topk_text"))
                    temp_audio = as_sent(gr.Slider(0.0, 1.5, defaults.temp_audio, step=0.05, label="Audio temperature", elem_id="temp_audio"))
                    topk_audio = as_sent(gr.Slider(1, MAX_TOP_K["audio"], defaults.topk_audio, step=1, label="Audio top-k", elem_id="topk_audio"))
                    seed = as_sent(gr.Number(inputs.RANDOM_SEED, precision=0, minimum=inputs.RANDOM_SEED, maximum=SEED_MAX,
                                             label=f"Seed (-1: random; 0 to {SEED_MAX})", elem_id="seed"))
                    greedy = gr.Checkbox(False, label="Greedy decoding", elem_id="greedy")
                    keep_persona = gr.Checkbox(True, label=f"Keep the persona past {context_min:g} minutes (the model "
                                               "forgets the oldest conversation instead)", elem_id="keep_persona")

        sampling = [temp_text, topk_text, temp_audio, topk_audio, seed, greedy]
        call_inputs = {"owner": owner, "role": role, "voice": voice, "custom_voice": custom_voice, "consent": consent,
                       **dict(zip(SAMPLING_NAMES, sampling, strict=True)), "mute": mute, "keep_persona": keep_persona}
        assert tuple(call_inputs) == CALL_INPUT_NAMES
        calls.connections = webrtc
        demo.load(new_owner, outputs=owner)
        persona.change(functools.partial(pick_persona, service, personas), inputs=[persona, voice], outputs=[role, voice])
        role.change(role_counter, inputs=role, outputs=role_count, show_progress="hidden")
        voice.change(lambda: gr.update(visible=False, value=None), outputs=preview_audio, show_progress="hidden")
        preview.click(functools.partial(preview_voice, service), inputs=[voice, custom_voice], outputs=preview_audio,
                      api_name="preview_voice")
        clip_args = {"inputs": [clip, consent, custom_voice], "outputs": [voice_status, custom_voice, voice, clip, voice_in_use]}
        clip.upload(functools.partial(upload_voice, service), api_name="upload_voice", **clip_args)
        clip.stop_recording(functools.partial(upload_voice, service), **clip_args)
        consent.change(functools.partial(upload_voice, service), **clip_args)  # ticked after the upload: the clip applies now
        webrtc.stream(ConversationHandler(calls), inputs=[webrtc, *call_inputs.values()], outputs=[webrtc],
                      concurrency_limit=max_sessions + 4)
        webrtc.on_additional_outputs(show_update, inputs=[owner],
                                     outputs=[live, conversation, details, recording, transcript_file],
                                     queue=True, concurrency_limit=None, show_progress="hidden")
        webrtc.start_recording(lambda: (gr.update(visible=False), gr.update(visible=False), []),
                               outputs=[recording, transcript_file, conversation])
        webrtc.stop_recording(functools.partial(stopped_call_files, service), inputs=[webrtc, owner],
                              outputs=[recording, transcript_file])
        offline_run.click(check_offline_input, inputs=offline_in, outputs=None).success(
            functools.partial(generate_offline, service), inputs=[offline_in, role, voice, custom_voice, consent, *sampling],
            outputs=[offline_agent, offline_mix, offline_text, offline_files], api_name="generate_offline")

        def voices() -> list[dict[str, str]]:
            """The voices of the loaded checkpoint: `name` (what `voice` takes) and `label` (what it sounds like)."""
            return list_voices(service)

        def persona_presets() -> list[dict[str, str]]:
            """The page's persona presets: `name`, `prompt` (the role prompt) and `voice` (suggested)."""
            return list_personas(personas)

        gr.api(voices, api_name="voices")
        gr.api(persona_presets, api_name="personas")
        timer = gr.Timer(STATUS_EVERY_S)
        timer.tick(functools.partial(poll_status, service), inputs=[voice, shown_voices], outputs=[status, voice, shown_voices])
        hide_internal_events(demo)
    service.when_ready(functools.partial(publish_checkpoint_voices, demo, voice, service))
    return demo


def publish_checkpoint_voices(demo: gr.Blocks, voice: gr.Dropdown, service: Service) -> None:
    """Once loaded, the voice list (of pages opened from now on, and of the API) is the checkpoint's.
    Gradio computes its page config and API description once; both are refreshed here."""
    names = service.voice_names()
    voice.choices = voice_choices(names)
    if voice.value not in names:
        voice.value = names[0]
    demo.config = demo.get_config_file()
    server = getattr(demo, "server_app", None)
    if server is not None:
        server.api_info = server.all_app_info = None


def hide_internal_events(demo: gr.Blocks) -> None:
    """Only what a person would call is in the API page (`PUBLIC_API`): the page's own events,
    and those fastrtc adds for every input of the stream, stay callable but are not listed."""
    for fn in demo.fns.values():
        if fn.api_name not in PUBLIC_API:
            fn.show_api = False


def idle_html() -> str:
    return ("<div class='live'><div class='meters'><div class='who'><span class='name'>You</span><span class='meter'><i></i></span>"
            "<span class='state'>—</span></div><div class='who'><span class='name'>Model</span><span class='meter'><i></i></span>"
            "<span class='state'>—</span></div></div><div class='verdict waiting'>press “Start the call”</div></div>")


def status_markdown(service: Service) -> str:
    """The engine now: loading, or ready with its conversations and its tick time."""
    s = service.status
    kind = {State.READY: "ready", State.FAILED: "failed"}.get(s.state, "busy")
    figures = service.figures()
    if s.state is State.READY and figures is not None:
        if figures.live:
            text = (f"**Ready** on {service.device.type}: {figures.live} of {figures.slots} conversations in progress; "
                    f"an 80 ms frame of all of them takes {figures.tick_ms:.0f} ms now")
        else:
            text = (f"**Ready** on {service.device.type} for {figures.slots} conversations at once; an 80 ms frame of "
                    f"all of them took {figures.tick_ms:.0f} ms at start-up")
        for shortfall in service.shortfalls:  # said, not only logged
            text += f"; running {html.escape(shortfall)}, slower than it should"
            kind = "busy"
        if figures.tick_ms > 80:
            text += f", {figures.tick_ms / 80:.1f}x slower than real time: live audio will stutter (use a GPU, or the offline tab)"
            kind = "failed"
        elif figures.tick_ms > BEHIND_TICK_MS:
            text += ", near the 80 ms a frame lasts"
            kind = "busy"
    else:
        text = f"**{s.state.value.capitalize()}**: {s.message}"
    text = f"<span class='dot {kind}'></span> {text}"
    if s.state is State.FAILED:
        text += "\n\nFix the problem above and restart the app. The offline tab and live calls need the model."
    return text


def poll_status(service: Service, current: Any, shown: Any):
    """The status line, and once loaded the checkpoint's own voice list (sent once per page)."""
    voices = service.voice_names() or RELEASE_VOICES
    if shown == voices:
        return status_markdown(service), gr.update(), shown
    value = current if current in voices or current == CUSTOM_VOICE else voices[0]
    return status_markdown(service), gr.update(choices=voice_choices(voices), value=value), voices


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


def preview_voice(service: Service, voice: Any, custom_voice: Any = ""):
    """A few seconds of the model greeting you in a voice (made by the model on silence, then cached)."""
    try:
        key = voice_key(voice, custom_voice, True)
        path = service.voice_preview(key)
    except UserError as exc:
        raise gr.Error(str(exc), print_exception=False) from exc
    return gr.update(value=str(path), visible=True)


def upload_voice(service: Service, voice_clip: Any, consent: Any, custom_voice: Any = ""):
    """A voice clip (uploaded or recorded), checked and encoded, becomes this page's custom voice.
    Returns a message, the voice's key, the voice list's choice, the clip box and the clip as
    the model hears it. A rejected clip is cleared from the box; the previous voice is kept."""
    key = custom_voice if isinstance(custom_voice, str) else ""
    keep = gr.update()
    if not voice_clip or not isinstance(voice_clip, str):
        return "", key, keep, keep, keep
    try:
        if not inputs.flag("the consent box", consent):
            return "⚠ Tick the consent box to use this clip.", key, keep, keep, keep
        voice = service.add_custom_voice(voice_clip)
    except UserError as exc:
        kept = " The previous custom voice is kept." if key else ""
        return f"⚠ {html.escape(str(exc), quote=False)}.{kept}", key, keep, gr.update(value=None), keep
    return (f"✅ Custom voice ready ({voice.seconds:.1f} s). It is selected in the voice list.", voice.key,
            gr.update(value=CUSTOM_VOICE), keep, gr.update(value=str(voice.clip), visible=True))


def list_voices(service: Service) -> list[dict[str, str]]:
    """The voices of the loaded checkpoint: name (what `voice` takes) and what it sounds like."""
    return [{"name": n, "label": voice_label(n)} for n in service.voice_names()]


def list_personas(personas: dict[str, dict]) -> list[dict[str, str]]:
    """The page's persona presets: name, role prompt and suggested voice."""
    return [{"name": n, "prompt": p["prompt"], "voice": p.get("voice", "")} for n, p in personas.items()]


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
def generate_offline(service: Service, user_audio: Any, role_prompt: Any, voice: Any, custom_voice: Any, consent: Any,
                     text_temperature: Any, text_top_k: Any, audio_temperature: Any, audio_top_k: Any, seed: Any, greedy: Any,
                     progress=gr.Progress()):  # noqa: B008 (Gradio reads it from the signature)
    """The model's side of a recorded conversation: its audio (as long as the input), a stereo mix of
    both sides, the conversation as text, and the three files."""
    check_offline_input(user_audio)
    try:
        values = {"role": role_prompt, "voice": voice, "custom_voice": custom_voice, "consent": consent}
        sampling = (text_temperature, text_top_k, audio_temperature, audio_top_k, seed, greedy)
        voice, role, params = call_settings({**values, **dict(zip(SAMPLING_NAMES, sampling, strict=True))})
        pcm = read_audio(user_audio, max_seconds=600)
        result = service.run_offline(voice, role, params, pcm, lambda done, total: progress(done / total, desc="generating"))
    except UserError as exc:
        raise gr.Error(str(exc), print_exception=False) from exc
    except Exception as exc:  # a fault: logged with its traceback, said in one line on the page
        logger.exception("offline run failed")
        raise gr.Error(f"the engine failed: {exc}") from exc
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


CSS = """
#status {min-height: 2.5em}
.dot {display: inline-block; width: 0.7em; height: 0.7em; border-radius: 50%; margin-right: 0.3em}
.dot.ready {background: #16a34a} .dot.failed {background: #dc2626} .dot.busy {background: #f59e0b}
.live {display: flex; flex-wrap: wrap; align-items: center; gap: 0.6em 1.2em; padding: 0.4em 0.2em}
.meters {display: flex; flex-direction: column; gap: 0.3em; flex: 1 1 16em}
.who {display: flex; align-items: center; gap: 0.6em; font-size: 0.95em}
.who .name {width: 3.6em; font-weight: 600}
.who .meter {flex: 1; height: 0.55em; border-radius: 0.3em; background: #e5e7eb; overflow: hidden}
.who .meter i {display: block; height: 100%; width: 0; background: #9ca3af; transition: width 0.2s}
.who.speaking .meter i {background: #6366f1}
.who .state {width: 5.5em; color: #6b7280; font-size: 0.85em}
.who.speaking .state {color: #4338ca; font-weight: 600}
.verdict {padding: 0.25em 0.8em; border-radius: 1em; font-weight: 600; font-size: 0.9em; white-space: nowrap}
.verdict.ok {background: #dcfce7; color: #166534} .verdict.behind {background: #fef3c7; color: #92400e}
.verdict.dropping {background: #fee2e2; color: #991b1b} .verdict.waiting {background: #f3f4f6; color: #4b5563}
.live .warn {flex-basis: 100%; margin: 0}
.details td {padding: 2px 10px 2px 0; font-size: 0.9em}
.warn {color: #b45309; font-weight: 600}
.hint {color: #6b7280; font-size: 0.9em}
#webrtc div[title='grant webcam access'] {max-height: 8em}
#webrtc div[title='grant webcam access'] .wrap {font-size: 0; min-height: 0; height: 100%}
#webrtc div[title='grant webcam access'] .wrap > * {font-size: var(--text-lg)}
#webrtc div[title='grant webcam access'] .wrap::after {content: "Start the call"; font-size: var(--text-lg)}
"""


# fastrtc first shows a tile that only asks for the microphone, then its start button: the tile
# is labelled as the start button, and once the microphone is granted the call starts by itself.
ONE_CLICK_START = """
() => {
  document.addEventListener("click", (event) => {
    if (!event.target.closest("#webrtc div[title='grant webcam access'] button")) return;
    const since = Date.now();
    const poll = setInterval(() => {
      const start = document.querySelector("#webrtc button[aria-label='start stream']");
      if (start) { clearInterval(poll); start.click(); }
      else if (Date.now() - since > 20000) clearInterval(poll);  // the microphone was refused
    }, 100);
  }, true);
}
"""


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
                   help="seconds without audio from the browser before a call is closed")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("aioice").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="The '(theme|css|js)' parameter in the Blocks constructor")
    warnings.filterwarnings("ignore", message="The 'show_copy_all_button' parameter")  # Gradio 6 renames these
    warnings.filterwarnings("ignore", message="The 'show_api' parameter in event listeners")  # Gradio 6 renames it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a stopped server deletes its files on the way out
    args = parse_args(argv)
    service = Service(Settings(args.checkpoint, args.hf_repo, args.config, args.device, args.max_sessions))
    service.start()
    limits = Limits(time_limit_s=args.time_limit or None, idle_timeout_s=args.idle_timeout)
    demo = build_ui(service, limits, args.max_sessions or 64)
    demo.queue(default_concurrency_limit=8).launch(
        server_name=args.host, server_port=args.port, share=args.share, max_file_size="100mb", quiet=True,
        prevent_thread_lock=True,
    )
    logger.info("%s: open %s in a browser", PAGE_UP, demo.local_url)
    if args.share:
        logger.info("public link: %s", demo.share_url or "none (Gradio could not make one; see above)")
    else:
        logger.info("for a public link, start it with --share (or PERSONAPLEX_SHARE=1)")
    demo.block_thread()


if __name__ == "__main__":
    main()
