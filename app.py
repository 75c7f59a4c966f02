"""PersonaPlex Live: talk with PersonaPlex-7B in the browser (Gradio 5 + fastrtc WebRTC).

UI only. The page is built at once; the model loads in the background (`personaplex.service`)
and a status line says what is happening. A live call is a `personaplex.session.Session`, which
owns the conversation's timeline; the fastrtc handler here only passes audio in and out and
turns the session's state into captions and health figures for the page. Everything a call
leaves belongs to the browser session that made it: a per-page token kept on the server
(`gr.State`) is checked before captions or files are shown. A second tab runs the same engine
on a recording.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import html
import json
import logging
import os
import secrets
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
from personaplex.audio import AudioError, float_to_int16, int16_to_float, read_audio, wav_bytes
from personaplex.config import FRAME_RATE, SAMPLE_RATE
from personaplex.errors import SettingsError, UserError
from personaplex.recording import FRAME_S, Transcript, clock_text
from personaplex.sampling import MAX_TOP_K, SEED_MAX, SamplingParams
from personaplex.service import CUSTOM_VOICE_SECONDS, MAX_ROLE_CHARS, Service, Settings, State
from personaplex.session import REALTIME, Limits, Phase, Session

logger = logging.getLogger("personaplex.app")

ASSETS = Path(__file__).parent / "assets"
RELEASE_VOICES = [f"NAT{g}{i}" for g in "FM" for i in range(4)] + [f"VAR{g}{i}" for g in "FM" for i in range(5)]
CUSTOM_VOICE = "Custom voice (uploaded)"
HEALTH_EVERY = 6  # frames between page updates when no new words arrive (about 2 a second)
ARGS_TIMEOUT_S = 3.0  # the page sends a call's settings within this time of connecting, or the call ends
END_STREAM_DELAY_S = 0.3  # the last captions and files reach the page before the call is closed
CLOSE_DELAY_S = 0.5  # then the browser closes its side; the server closes its own after this
CAPTION_TURNS = 50  # turns shown live (the transcript file has them all)
SAMPLING_NAMES = ("temp_text", "topk_text", "temp_audio", "topk_audio", "seed", "greedy")
CALL_INPUT_NAMES = ("owner", "role", "voice", "custom_voice", "consent", *SAMPLING_NAMES)  # what a call reads from the page


def load_personas() -> tuple[dict[str, dict], str]:
    raw = json.loads((ASSETS / "personas.json").read_text())
    return {p["name"]: p for p in raw["personas"]}, raw["default"]


def new_owner() -> str:
    """A page session's token: what it made can be fetched with it, and with nothing else."""
    return secrets.token_urlsafe(24)


def same_owner(a: Any, b: Any) -> bool:
    return isinstance(a, str) and isinstance(b, str) and bool(a) and secrets.compare_digest(a, b)


def voice_key(voice: Any, custom_voice: Any, consent: Any) -> str:
    """The service's name for the chosen voice: a checkpoint voice, or this page's upload."""
    voice = inputs.text("the voice", voice, empty_if_none=False)
    if voice != CUSTOM_VOICE:
        return voice
    if not inputs.text("the custom voice", custom_voice) or not inputs.flag("the consent box", consent):
        raise AudioError("upload a custom voice and tick the consent box, or pick a voice from the list")
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


@dataclass(frozen=True)
class CallUpdate:
    """What the page shows of a call, for the page session `owner` only."""

    owner: str | None
    captions: str
    health: str  # html
    files: tuple[str, str] | None = None  # after the call: the recording and the transcript


@dataclass
class Calls:
    """What every connection's handler shares."""

    service: Service
    limits: Limits
    connections: WebRTC | None = None  # fastrtc's peer connections, to close one the app ends


class ConversationHandler(AsyncStreamHandler):
    """One WebRTC connection, an adapter: microphone -> `Session.push`; `Session.next_async` ->
    speaker; the session's state -> captions and health for the page."""

    def __init__(self, calls: Calls) -> None:
        super().__init__(expected_layout="mono", output_sample_rate=SAMPLE_RATE, input_sample_rate=SAMPLE_RATE)
        self.calls = calls
        self.session = Session(calls.limits)
        self.owner: str | None = None
        self.call_id: str | None = None
        self.voice = ""
        self.captions = Transcript()
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
            if self.owner:
                self.session.record_to(self.calls.service.files.recording(self.owner, self.call_id))
            await asyncio.to_thread(self.calls.service.start_call, self.session, voice, role, sampling)
            self.voice = voice
            logger.info("call %s: started with voice %s", self._tag, voice)
        except UserError as exc:
            self._refuse(str(exc))
        except Exception as exc:  # the handler's boundary: a fault, said on the page and logged once
            logger.exception("call %s: could not start", self._tag)
            self.session.end("error", f"the call could not start: {exc}")

    async def receive(self, frame: tuple[int, np.ndarray]) -> None:
        self.session.push(int16_to_float(frame[1].reshape(-1)))

    async def emit(self):
        if self._finished:
            await asyncio.sleep(0.05)
            return None
        out = await self.session.next_async(0.05)
        if out is not None:
            self.captions.add(out.index * FRAME_S, out.text)
            del self.captions.turns[:-CAPTION_TURNS]
            audio = (SAMPLE_RATE, float_to_int16(out.pcm)[None])
            self._since_update += 1
            if (out.text or self._since_update >= HEALTH_EVERY) and self._channel_open():
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
        loop = asyncio.get_running_loop()
        loop.call_later(END_STREAM_DELAY_S, self._end_stream, ending.message)
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
        connections = self.calls.connections
        pc = connections.pcs.get(self.call_id) if connections is not None and self.call_id else None
        if pc is not None:
            await pc.close()  # frees fastrtc's connection slot now, not after ICE gives up

    # --- what the page shows ---------------------------------------------------------------
    def _named_args(self) -> dict[str, Any]:
        """The page's values, by name (fastrtc puts the stream's inputs last, in their order)."""
        return dict(zip(CALL_INPUT_NAMES, self.latest_args[-len(CALL_INPUT_NAMES):], strict=True))

    @property
    def _tag(self) -> str:
        return (self.call_id or "?")[:8]

    def _update(self, final: bool = False) -> CallUpdate:
        files = None
        recording = self.session.recording
        if final and recording is not None and recording.closed.is_set() and recording.model_frames:
            files = (str(recording.wav_path), str(recording.transcript_path))
        return CallUpdate(self.owner, self.captions.render(), call_health(self.calls, self.session), files)


def current_connection() -> str | None:
    """The id of the WebRTC connection whose task this is (fastrtc's context), if any."""
    try:
        return get_current_context().webrtc_id
    except RuntimeError:  # not inside a connection's task
        return None


def call_health(calls: Calls, session: Session) -> str:
    """The call's figures as an html table (and why it ended, once it has)."""
    s, limits = session.stats, session.limits
    worker = calls.service.worker
    tick_ms = worker.last_tick_ms if worker is not None else 0.0
    limit = f" of {clock_text(limits.time_limit_s)}" if limits.time_limit_s else ""
    rows = [
        ("state", {Phase.WAITING: "connecting", Phase.STARTING: "loading the persona", Phase.LIVE: "live",
                   Phase.ENDED: "ended"}[session.phase]),
        ("engine tick", f"{tick_ms:.1f} ms per 80 ms frame (real-time factor {tick_ms / 80:.2f})"),
        ("dropped audio", f"{s.unheard + s.too_fast} frames of yours, {s.silent_out + s.dropped_out} of the model's"),
        ("call time", f"{clock_text(session.elapsed_s)}{limit}"),
    ]
    cells = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)
    note, ending = "", session.ending.reason if session.ending is not None else ""
    if session.ending is not None:
        note = f"<p class='warn'>⚠ {html.escape(session.ending.message, quote=False)}</p>"
    elif session.phase is Phase.LIVE:
        context_s = calls.service.config.lm.context / FRAME_RATE
        left = context_s - session.prompt_frames / FRAME_RATE - s.frames_in * FRAME_S
        if left < 30:
            note = (f"<p class='warn'>⚠ {clock_text(max(left, 0))} left before the model's memory is full: the persona "
                    "will start to fade. Stop and start again to refresh it.</p>")
    return f"<div data-ending='{ending}'><table class='health'>{cells}</table>{note}</div>"


def show_update(owner: Any, update: Any):
    """The page's view of a call update: only for the page session that made the call."""
    keep = gr.update()
    if not isinstance(update, CallUpdate) or not same_owner(owner, update.owner):
        return keep, keep, keep, keep
    if update.files is None:
        return update.captions, update.health, keep, keep
    wav, text = update.files
    return update.captions, update.health, gr.update(value=wav, visible=True), gr.update(value=text, visible=True)


def stopped_call_files(service: Service, webrtc_value: Any, owner: Any):
    """After the user pressed stop: this page's recording of that call, once it is complete."""
    call_id = getattr(webrtc_value, "webrtc_id", webrtc_value)
    recording = service.files.find(owner if isinstance(owner, str) else None, call_id if isinstance(call_id, str) else None)
    if recording is None or not recording.closed.wait(5.0) or not recording.model_frames:
        hidden = gr.update(value=None, visible=False)
        return hidden, hidden
    return gr.update(value=str(recording.wav_path), visible=True), gr.update(value=str(recording.transcript_path), visible=True)


def build_ui(service: Service, limits: Limits, max_sessions: int) -> gr.Blocks:
    personas, default = load_personas()
    calls = Calls(service, limits)
    rtc, server_rtc = turn_configuration()

    with gr.Blocks(title="PersonaPlex Live", css=CSS, theme=gr.themes.Soft(), delete_cache=(600, 3600)) as demo:
        owner = gr.State(None)  # this page's token, made when the page loads; never sent to the browser
        custom_voice = gr.State("")  # this page's uploaded voice (the service's key)
        gr.Markdown("# PersonaPlex Live\nFull-duplex speech with NVIDIA PersonaPlex-7B: talk, interrupt, and pick who it is and how it sounds.")
        status = gr.Markdown(status_markdown(service), elem_id="status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                persona = gr.Dropdown(list(personas), value=default, label="Persona", elem_id="persona")
                role = gr.Textbox(personas[default]["prompt"], label="Role prompt", lines=5, elem_id="role",
                                  info="Who the model is and what it knows. May be empty.")
                role_count = gr.Markdown(role_counter(personas[default]["prompt"]), elem_id="role_count")
                voice = gr.Dropdown([*RELEASE_VOICES, CUSTOM_VOICE], value=personas[default].get("voice", "NATF2"), label="Voice", elem_id="voice",
                                    allow_custom_value=True)  # the checkpoint's list arrives after loading; names are checked there
                with gr.Accordion("Custom voice", open=False):
                    gr.Markdown(
                        f"Upload {CUSTOM_VOICE_SECONDS[0]:g} to {CUSTOM_VOICE_SECONDS[1]:g} s of clean speech (wav, flac, mp3, ogg). "
                        "Only use a voice you own or have permission to use; do not impersonate anyone."
                    )
                    consent = gr.Checkbox(False, label="I have the right to use this voice", elem_id="consent")
                    voice_file = gr.File(label="Voice clip", elem_id="voice_file", type="filepath")
                    voice_status = gr.Markdown("", elem_id="voice_status")
                with gr.Accordion("Sampling (advanced)", open=False):
                    defaults = SamplingParams()
                    temp_text = as_sent(gr.Slider(0.0, 1.5, defaults.temp_text, step=0.05, label="Text temperature", elem_id="temp_text"))
                    topk_text = as_sent(gr.Slider(1, MAX_TOP_K["text"], defaults.topk_text, step=1, label="Text top-k", elem_id="topk_text"))
                    temp_audio = as_sent(gr.Slider(0.0, 1.5, defaults.temp_audio, step=0.05, label="Audio temperature", elem_id="temp_audio"))
                    topk_audio = as_sent(gr.Slider(1, MAX_TOP_K["audio"], defaults.topk_audio, step=1, label="Audio top-k", elem_id="topk_audio"))
                    seed = as_sent(gr.Number(inputs.RANDOM_SEED, precision=0, minimum=inputs.RANDOM_SEED, maximum=SEED_MAX,
                                             label=f"Seed (-1: random; 0 to {SEED_MAX})", elem_id="seed"))
                    greedy = gr.Checkbox(False, label="Greedy decoding", elem_id="greedy")
            with gr.Column(scale=3, min_width=360):
                with gr.Tab("Live conversation"):
                    gr.Markdown("Press the microphone button and speak. Headphones avoid echo. The model hears you while it talks.")
                    webrtc = WebRTC(label="Conversation", modality="audio", mode="send-receive", full_screen=False,
                                    rtc_configuration=rtc, server_rtc_configuration=server_rtc, elem_id="webrtc")
                    health = gr.HTML("", elem_id="health")
                    transcript = gr.Textbox(label="What the model says", lines=6, interactive=False, elem_id="transcript")
                    with gr.Row():
                        recording = gr.File(label="Recording (stereo: you left, model right)", elem_id="recording", visible=False)
                        transcript_file = gr.File(label="Transcript", elem_id="transcript_file", visible=False)
                with gr.Tab("Offline"):
                    gr.Markdown("No WebRTC needed: give the user's side of a conversation, get the model's side back.")
                    offline_in = gr.Audio(sources=["upload", "microphone"], type="filepath", label="User side", elem_id="offline_in")
                    offline_run = gr.Button("Generate the model's side", variant="primary", elem_id="offline_run")
                    offline_agent = gr.Audio(label="Model's side", type="filepath", elem_id="offline_agent")
                    offline_mix = gr.Audio(label="Both sides (stereo)", type="filepath", elem_id="offline_mix")
                    offline_text = gr.Textbox(label="What the model says", lines=4, interactive=False, elem_id="offline_text")
                    offline_files = gr.File(label="Downloads", file_count="multiple", elem_id="offline_files")

        call_inputs = {"owner": owner, "role": role, "voice": voice, "custom_voice": custom_voice, "consent": consent,
                       "temp_text": temp_text, "topk_text": topk_text, "temp_audio": temp_audio, "topk_audio": topk_audio,
                       "seed": seed, "greedy": greedy}
        assert tuple(call_inputs) == CALL_INPUT_NAMES
        calls.connections = webrtc
        demo.load(new_owner, outputs=owner, show_api=False)
        persona.change(lambda name, current: pick_persona(service, personas.get(name), current),
                       inputs=[persona, voice], outputs=[role, voice])
        role.change(role_counter, inputs=role, outputs=role_count, show_progress="hidden")
        voice_file.upload(functools.partial(add_voice, service), inputs=[voice_file, consent, custom_voice],
                          outputs=[voice_status, custom_voice, voice])
        webrtc.stream(ConversationHandler(calls), inputs=[webrtc, *call_inputs.values()], outputs=[webrtc],
                      concurrency_limit=max_sessions + 4)
        webrtc.on_additional_outputs(show_update, inputs=[owner], outputs=[transcript, health, recording, transcript_file],
                                     queue=True, concurrency_limit=None, show_progress="hidden")
        webrtc.start_recording(lambda: (gr.update(visible=False), gr.update(visible=False)),
                               outputs=[recording, transcript_file], show_api=False)
        webrtc.stop_recording(functools.partial(stopped_call_files, service), inputs=[webrtc, owner],
                              outputs=[recording, transcript_file], show_api=False)
        offline_run.click(functools.partial(run_offline, service),
                          inputs=[offline_in, role, voice, custom_voice, consent, temp_text, topk_text, temp_audio, topk_audio, seed, greedy],
                          outputs=[offline_agent, offline_mix, offline_text, offline_files])
        timer = gr.Timer(1.0)
        timer.tick(lambda current: poll_status(service, current), inputs=[voice], outputs=[status, voice, timer])
    return demo


def status_markdown(service: Service) -> str:
    s = service.status
    kind = {State.READY: "ready", State.FAILED: "failed"}.get(s.state, "busy")
    text = f"<span class='dot {kind}'></span> **{s.state.value.capitalize()}**: {s.message}"
    if s.state is State.FAILED:
        text += "\n\nFix the problem above and restart the app. The offline tab and live calls need the model."
    return text


def poll_status(service: Service, current: str):
    done = service.status.state in (State.READY, State.FAILED)
    voices = service.voice_names() or RELEASE_VOICES
    value = current if current in voices or current == CUSTOM_VOICE else voices[0]
    return status_markdown(service), gr.update(choices=[*voices, CUSTOM_VOICE], value=value), gr.Timer(active=not done)


def role_counter(text: str | None) -> str:
    n = len(text or "")
    if n > MAX_ROLE_CHARS:
        return f"<span class='warn'>⚠ {n} / {MAX_ROLE_CHARS} characters: too long, shorten it before you start</span>"
    return f"<small>{n} / {MAX_ROLE_CHARS} characters</small>"


def pick_persona(service: Service, persona: dict | None, current: str):
    """The persona's role text, and its voice when the checkpoint has it."""
    if persona is None:  # not one of the presets (an API client): change nothing
        return gr.update(), gr.update()
    wanted = persona.get("voice")
    available = service.voice_names() or RELEASE_VOICES
    return persona["prompt"], gr.update(value=wanted if wanted in available else current)


def add_voice(service: Service, path: Any, consent: Any, key: Any):
    """An uploaded voice clip: checked, encoded, and kept as this page's custom voice."""
    key = key if isinstance(key, str) else ""
    if not path or not isinstance(path, str):
        return "", key, gr.update()
    try:
        if not inputs.flag("the consent box", consent):
            return "⚠ Tick the consent box first, then upload the clip again.", key, gr.update()
        new_key, seconds = service.add_custom_voice(path)
    except UserError as exc:
        keep = " The previous custom voice is kept." if key else ""
        return f"⚠ {html.escape(str(exc), quote=False)}.{keep}", key, gr.update()
    return f"✅ Custom voice ready ({seconds:.1f} s). It is selected in the voice list.", new_key, gr.update(value=CUSTOM_VOICE)


def offline_files(service: Service, user: np.ndarray, agent: np.ndarray, transcript: str) -> list[str]:
    """The offline run's downloads, in a folder of the service's file store (deleted after a while)."""
    folder = service.files.folder()
    contents = {"model.wav": wav_bytes(agent), "both.wav": wav_bytes(np.stack([user, agent], axis=1)),
                "transcript.txt": (transcript or "(the model said nothing)\n").encode()}
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    return [str(folder / name) for name in contents]


@spaces.GPU(duration=120)
def run_offline(service: Service, path, role, voice, custom_voice, consent, *sampling, progress=gr.Progress()):  # noqa: B008 (Gradio reads it from the signature)
    if not path or not isinstance(path, str):
        raise gr.Error("Upload or record the user's side first.")
    try:
        voice, role, params = call_settings({"role": role, "voice": voice, "custom_voice": custom_voice, "consent": consent,
                                             **dict(zip(SAMPLING_NAMES, sampling, strict=True))})
        pcm = read_audio(path, max_seconds=600)
        result = service.run_offline(voice, role, params, pcm, lambda done, total: progress(done / total, desc="generating"))
    except UserError as exc:
        raise gr.Error(str(exc)) from exc
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
.health td {padding: 2px 10px 2px 0; font-size: 0.9em}
.warn {color: #b45309; font-weight: 600}
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
    p.add_argument("--time-limit", type=float, default=float(env("TIME_LIMIT", "300")), help="seconds per call (0: none)")
    p.add_argument("--idle-timeout", type=float, default=float(env("IDLE_TIMEOUT", str(REALTIME.idle_timeout_s))),
                   help="seconds without audio from the browser before a call is closed")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("aioice").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="The '(theme|css)' parameter in the Blocks constructor")
    warnings.filterwarnings("ignore", message="The 'show_api' parameter in event listeners")  # Gradio 6 renames it
    args = parse_args(argv)
    service = Service(Settings(args.checkpoint, args.hf_repo, args.config, args.device, args.max_sessions))
    service.start()
    limits = Limits(time_limit_s=args.time_limit or None, idle_timeout_s=args.idle_timeout)
    demo = build_ui(service, limits, args.max_sessions or 64)
    demo.queue(default_concurrency_limit=8).launch(
        server_name=args.host, server_port=args.port, share=args.share, max_file_size="100mb"
    )


if __name__ == "__main__":
    main()
