"""PersonaPlex Live: talk with PersonaPlex-7B in the browser (Gradio 5 + fastrtc WebRTC).

UI only. The page is built at once; the model loads in the background (`personaplex.service`)
and a status line says what is happening. The fastrtc handler turns 40 ms microphone chunks
into 80 ms frames for the engine and the engine's frames back into audio, a live transcript
and health figures. A second tab runs the same engine on a recording.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import html
import json
import logging
import os
import tempfile
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import gradio as gr
import numpy as np
import spaces
from fastrtc import AdditionalOutputs, AsyncStreamHandler, CloseStream, WebRTC, wait_for_item

from personaplex.audio import AudioError, FrameBuffer, float_to_int16, int16_to_float, read_audio
from personaplex.config import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE
from personaplex.loading import CheckpointError
from personaplex.persona import PromptError
from personaplex.sampling import MAX_TOP_K, SamplingParams
from personaplex.service import (
    CUSTOM_VOICE_SECONDS,
    MAX_ROLE_CHARS,
    CallRecorder,
    NotReady,
    Service,
    Settings,
    State,
)
from personaplex.worker import Busy, FrameOut, Session

logger = logging.getLogger("personaplex.app")

ASSETS = Path(__file__).parent / "assets"
RELEASE_VOICES = [f"NAT{g}{i}" for g in "FM" for i in range(4)] + [f"VAR{g}{i}" for g in "FM" for i in range(5)]
CUSTOM_VOICE = "Custom voice (uploaded)"
OUTPUT_QUEUE = 6  # frames (480 ms): beyond that the oldest are dropped, latency never grows
WATCHDOG_S = 3.0  # a client that sends no audio this long is gone: free its slot
HEALTH_EVERY = 6  # frames between health updates when no new text arrives
FRIENDLY_ERRORS = (Busy, NotReady, AudioError, CheckpointError, PromptError, ValueError)
SILENCE = np.zeros(FRAME_SIZE, dtype=np.int16)


def load_personas() -> tuple[dict[str, dict], str]:
    raw = json.loads((ASSETS / "personas.json").read_text())
    return {p["name"]: p for p in raw["personas"]}, raw["default"]


def sampling_from(values: list) -> SamplingParams:
    temp_text, topk_text, temp_audio, topk_audio, seed, greedy = values
    seed = int(seed) if seed is not None and int(seed) >= 0 else int.from_bytes(os.urandom(4), "little")
    return SamplingParams(float(temp_text), int(topk_text), float(temp_audio), int(topk_audio), bool(greedy), seed)


def clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


class Recordings:
    """The last calls' recordings, by WebRTC connection id (looked up, never used as a path)."""

    def __init__(self, keep: int = 32) -> None:
        self.keep = keep
        self._calls: OrderedDict[str, CallRecorder] = OrderedDict()

    def put(self, key: str, call: CallRecorder) -> None:
        self._calls[key] = call
        while len(self._calls) > self.keep:
            self._calls.popitem(last=False)

    def get(self, key: str | None) -> CallRecorder | None:
        return self._calls.get(key or "")


class ConversationHandler(AsyncStreamHandler):
    """One WebRTC connection: mic frames to the engine, engine frames back, transcript out."""

    def __init__(self, service: Service, recordings: Recordings) -> None:
        super().__init__(expected_layout="mono", output_sample_rate=SAMPLE_RATE, input_sample_rate=SAMPLE_RATE)
        self.service = service
        self.recordings = recordings
        self.buffer = FrameBuffer()
        self.out_q: asyncio.Queue = asyncio.Queue()
        self.session: Session | None = None
        self.call: CallRecorder | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.problem: str | None = None
        self.transcript = ""
        self.dropped_out = 0
        self.filled = 0  # dropped input frames already answered with silence
        self.last_input = time.monotonic()
        self.refused = False

    def copy(self) -> ConversationHandler:
        return ConversationHandler(self.service, self.recordings)

    async def start_up(self) -> None:
        await self.wait_for_args()
        self._loop = asyncio.get_running_loop()
        webrtc_id, (role, voice, custom_key, consent, *sampling) = self.latest_args[1], self.latest_args[-10:]
        try:
            voice = voice_key(voice, custom_key, consent)
            self.call = CallRecorder(self.service.models.tokenizer if self.service.models else None)
            self.session = await asyncio.to_thread(
                self.service.open_conversation, voice, role or "", sampling_from(sampling), self._on_frame
            )
            self.recordings.put(str(webrtc_id), self.call)
        except FRIENDLY_ERRORS as exc:
            self.problem = str(exc)
            logger.info("call refused: %s", exc)
        self.last_input = time.monotonic()

    async def receive(self, frame: tuple[int, np.ndarray]) -> None:
        _, pcm = frame
        self.last_input = time.monotonic()
        for chunk in self.buffer.push(int16_to_float(pcm.reshape(-1))):
            session = self.session
            if session is not None and session.ready.is_set() and not session.closed.is_set():
                session.push(chunk)
            else:  # the prompt is still loading (or the call was refused): keep time with silence
                self._queue((SAMPLE_RATE, SILENCE[None]))

    def _on_frame(self, out: FrameOut) -> None:
        """Called on the engine thread for every frame of this call."""
        piece = self.call.add(out) if self.call is not None else ""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, out, piece)

    def _deliver(self, out: FrameOut, piece: str) -> None:
        self.transcript += piece
        # Input frames the engine dropped (a burst, a slow tick) get silence: every 80 ms in
        # still gives 80 ms out, and the browser's playback clock stays with the microphone's.
        dropped = self.session.stats.dropped if self.session is not None else 0
        for _ in range(dropped - self.filled):
            self._queue((SAMPLE_RATE, SILENCE[None]))
        self.filled = max(self.filled, dropped)
        audio = (SAMPLE_RATE, float_to_int16(out.pcm)[None])
        if piece or out.index % HEALTH_EVERY == 0:
            self._queue((audio, AdditionalOutputs(self.transcript.strip(), self._health(out))))
        else:
            self._queue(audio)

    def _queue(self, item: object) -> None:
        while self.out_q.qsize() >= OUTPUT_QUEUE:
            self.out_q.get_nowait()
            self.dropped_out += 1
        self.out_q.put_nowait(item)

    def _health(self, out: FrameOut) -> str:
        session = self.session
        stats = session.stats if session else None
        elapsed = out.index / FRAME_RATE
        context_s = self.service.config.lm.context / FRAME_RATE
        left = max(0.0, context_s - elapsed - (session.prompt_frames if session else 0) / FRAME_RATE)
        rows = [
            ("engine tick", f"{out.tick_ms:.1f} ms per 80 ms frame (real-time factor {out.tick_ms / 80:.2f})"),
            ("dropped frames", f"{stats.dropped if stats else 0} of your audio, {self.dropped_out} of the model's, "
                               f"{stats.late if stats else 0} ticks without your audio"),
            ("call time", f"{clock(elapsed)} (the model remembers about {clock(context_s)})"),
        ]
        warning = ""
        if left < 30:
            warning = (
                f"<p class='warn'>⚠ {clock(left)} left before the model's memory is full: the persona "
                "will start to fade. Stop and start again to refresh it.</p>"
            )
        cells = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)
        return f"<table class='health'>{cells}</table>{warning}"

    async def emit(self):
        if self.problem is None and self.session is not None and self.session.error is not None:
            self.problem = f"the call could not start: {self.session.error}"
        if self.problem is not None:
            if self.refused:  # the message is shown: end the call
                return CloseStream(self.problem)
            self.refused = True
            return AdditionalOutputs("", f"<p class='warn'>⚠ {html.escape(self.problem, quote=False)}</p>")
        if time.monotonic() - self.last_input > WATCHDOG_S:
            await self.shutdown()
            return CloseStream("no audio from the browser: the call was closed")
        return await wait_for_item(self.out_q, 0.05)

    async def shutdown(self) -> None:
        if self.session is not None:
            self.session.close()


def build_ui(service: Service, time_limit: float | None, max_sessions: int) -> gr.Blocks:
    personas, default = load_personas()
    recordings = Recordings()
    handler = ConversationHandler(service, recordings)
    rtc, server_rtc = turn_configuration()

    with gr.Blocks(title="PersonaPlex Live", css=CSS, theme=gr.themes.Soft()) as demo:
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
                    custom_key = gr.Textbox("", visible=False)
                with gr.Accordion("Sampling (advanced)", open=False):
                    temp_text = gr.Slider(0.0, 1.5, 0.7, step=0.05, label="Text temperature")
                    topk_text = gr.Slider(1, MAX_TOP_K["text"], 25, step=1, label="Text top-k")
                    temp_audio = gr.Slider(0.0, 1.5, 0.8, step=0.05, label="Audio temperature")
                    topk_audio = gr.Slider(1, MAX_TOP_K["audio"], 250, step=1, label="Audio top-k")
                    seed = gr.Number(-1, precision=0, label="Seed (-1: random)")
                    greedy = gr.Checkbox(False, label="Greedy decoding")
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

        sampling = [temp_text, topk_text, temp_audio, topk_audio, seed, greedy]
        persona.change(lambda name, current: pick_persona(service, personas[name], current),
                       inputs=[persona, voice], outputs=[role, voice])
        role.change(role_counter, inputs=role, outputs=role_count, show_progress="hidden")
        voice_file.upload(lambda path, ok, key: add_voice(service, path, ok, key), inputs=[voice_file, consent, custom_key],
                          outputs=[voice_status, custom_key, voice])
        webrtc.stream(handler, inputs=[webrtc, role, voice, custom_key, consent, *sampling], outputs=[webrtc],
                      time_limit=time_limit, concurrency_limit=max_sessions + 4)
        webrtc.on_additional_outputs(lambda text, html: (text, html), outputs=[transcript, health], queue=True,
                                     concurrency_limit=None, show_progress="hidden")
        webrtc.stop_recording(lambda key: show_call_files(recordings.get(key)), inputs=[webrtc], outputs=[recording, transcript_file])
        offline_run.click(functools.partial(run_offline, service), inputs=[offline_in, role, voice, custom_key, consent, *sampling],
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


def pick_persona(service: Service, persona: dict, current: str):
    """The persona's role text, and its voice when the checkpoint has it."""
    wanted = persona.get("voice")
    available = service.voice_names() or RELEASE_VOICES
    return persona["prompt"], gr.update(value=wanted if wanted in available else current)


def add_voice(service: Service, path: str | None, consent: bool, key: str):
    if not path:
        return "", key, gr.update()
    if not consent:
        return "⚠ Tick the consent box first, then upload the clip again.", key, gr.update()
    try:
        new_key, seconds = service.add_custom_voice(path)
    except FRIENDLY_ERRORS as exc:
        keep = " The previous custom voice is kept." if key else ""
        return f"⚠ {html.escape(str(exc), quote=False)}.{keep}", key, gr.update()
    return f"✅ Custom voice ready ({seconds:.1f} s). It is selected in the voice list.", new_key, gr.update(value=CUSTOM_VOICE)


def voice_key(voice: str, custom_key: str, consent: bool) -> str:
    """The service's name for the chosen voice: a checkpoint voice, or the uploaded one."""
    if voice != CUSTOM_VOICE:
        return voice
    if not custom_key or not consent:
        raise AudioError("upload a custom voice and tick the consent box, or pick a voice from the list")
    return custom_key


def save_files(prefix: str, contents: dict[str, bytes]) -> list[str]:
    """Write downloads into a fresh folder of the temp dir (where Gradio serves files from)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    return [str(folder / name) for name in contents]


def call_files(call: CallRecorder | None) -> tuple[str | None, str | None]:
    """The finished call as a stereo wav and a text file (None, None when nothing was said)."""
    if call is None or not call.agent:
        return None, None
    wav, text = save_files("personaplex-call-", {"call.wav": call.stereo_wav(), "transcript.txt": transcript_bytes(call)})
    return wav, text


def transcript_bytes(call: CallRecorder) -> bytes:
    return (call.transcript + "\n").encode()


def show_call_files(call: CallRecorder | None):
    wav, text = call_files(call)
    return gr.update(value=wav, visible=wav is not None), gr.update(value=text, visible=text is not None)


@spaces.GPU(duration=120)
def run_offline(service: Service, path, role, voice, custom_key, consent, *sampling, progress=gr.Progress()):  # noqa: B008 (Gradio reads it from the signature)
    if not path:
        raise gr.Error("Upload or record the user's side first.")
    try:
        voice = voice_key(voice, custom_key, consent)
        pcm = read_audio(path, max_seconds=600)
        call = service.run_offline(voice, role or "", sampling_from(list(sampling)), pcm,
                                   lambda done, total: progress(done / total, desc="generating"))
    except FRIENDLY_ERRORS as exc:
        raise gr.Error(str(exc)) from exc
    files = save_files("personaplex-offline-", {
        "model.wav": call.agent_wav(), "both.wav": call.stereo_wav(), "transcript.txt": transcript_bytes(call),
    })
    return files[0], files[1], call.transcript, files


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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("aioice").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="The '(theme|css)' parameter in the Blocks constructor")
    args = parse_args(argv)
    service = Service(Settings(args.checkpoint, args.hf_repo, args.config, args.device, args.max_sessions))
    service.start()
    demo = build_ui(service, args.time_limit or None, args.max_sessions or 64)
    demo.queue(default_concurrency_limit=8).launch(
        server_name=args.host, server_port=args.port, share=args.share, max_file_size="100mb"
    )


if __name__ == "__main__":
    main()
