"""PersonaPlex Live: talk with PersonaPlex-7B in the browser (Gradio 5 + fastrtc WebRTC).

The page only: its layout and what each control is wired to. The page is built at once; the
model loads in the background (`personaplex.serve.service`, or with `--engine-url` the engines
of a cluster, `personaplex.serve.remote`: then neither torch nor the engine is imported here)
and a status line says what the engine is doing. The page holds one `CallService` and knows
nothing else of the server side. A live call is one WebRTC connection (`web.handler`, an
adapter around the same call lifecycle as `/api/chat`), which sends the page what it shows of
the call on the call's own data channel (`web.call_page`). Everything a call leaves belongs to
the browser session that made it: its connection answers only the page that opened it
(`web.connections`), and a per-page token kept on the server (`gr.State`) is checked before its
files are shown. A second tab runs the same engine on a recording. The API lists only what a
person would call (`PUBLIC_API`; `web.events`), with parameter names that say what they are.
What strangers can send is bounded at the door (`web.limits`, `web.gradio_queue`).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
from fastrtc import WebRTC
from gradio.utils import get_upload_folder as gradio_upload_folder
from starlette.middleware import Middleware
from starlette.routing import WebSocketRoute

from personaplex.serve import api_chat, inputs
from personaplex.serve.contract import (
    CUSTOM_VOICE_SECONDS,
    KV_FORMATS,
    MAX_TOP_K,
    REALTIME,
    SEED_MAX,
    WEIGHT_FORMATS,
    CallService,
    Limits,
    SamplingParams,
    offline_runs,
)
from web import call_page, events
from web.call_page import idle_html
from web.connections import MAX_OPENING, CallConnections
from web.events import PersonaInfo, Upload, VoiceInfo
from web.gradio_queue import explain_refusals, forget_finished_events, quiet_component_server
from web.handler import Calls, ConversationHandler
from web.limits import RequestLimits, RequestSizes
from web.values import (
    CALL_INPUT_NAMES,
    RELEASE_VOICES,
    SAMPLING_NAMES,
    as_sent,
    load_personas,
    voice_choices,
    whole_number,
)

logger = logging.getLogger("personaplex.app")

TINY_CHECKPOINT = Path(__file__).parent / "tests" / "fixtures" / "tiny" / "checkpoint"  # the release format, random weights
TINY_BANNER = (
    "<div class='banner'><b>This is the tiny test model, not PersonaPlex-7B.</b> No CUDA GPU was found, so the page "
    "runs the tiny random-weight model the tests use: it babbles (in real time on a CPU), to show how the page works. "
    "The real model needs a CUDA GPU with 24 GB or more; to choose a model yourself, start the app with "
    "<code>--checkpoint DIR</code>, <code>--hf-repo REPO</code> or <code>--device cpu</code> (the 7B, far slower than "
    "real time).</div>"
)
STATUS_EVERY_S = 2.0
SPARE_CONNECTIONS = 8  # connections beyond the calls and the openings: a caller refused as busy reads why
PREVIEWS_AT_ONCE = 1  # voice previews made at once (each holds a slot for a moment; then it is cached)
SESSIONS_KEPT = 500  # page sessions whose state Gradio keeps (110 KB each, measured); an open page stays (its status ticks)
PAGE_UP = "the page is up"  # logged with its address once the server listens
PUBLIC_API = ("generate_offline", "upload_voice", "preview_voice", "voices", "personas")
WEIGHTS = ("auto", *WEIGHT_FORMATS)  # auto: bf16 where 8 conversations fit beside it, else int8


# --- the page --------------------------------------------------------------------------------
def build_ui(service: CallService, limits: Limits, max_sessions: int, banner: str = "") -> gr.Blocks:
    personas, default = load_personas()
    calls = Calls(service, limits)
    remote = not service.has_model  # calls go to a cluster: no previews, no offline tab
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
        status = gr.Markdown(events.status_markdown(service), elem_id="status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=340):
                with gr.Tab("Live conversation"):
                    summary = gr.HTML(events.persona_summary(default, personas[default].get("voice", "NATF2")), elem_id="summary")
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
                role_count = gr.Markdown(events.role_counter(personas[default]["prompt"]), elem_id="role_count")
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
        demo.load(events.new_owner, outputs=owner)
        persona.change(functools.partial(events.pick_persona, service, personas), inputs=[persona, voice], outputs=[role, voice])
        gr.on([persona.change, voice.change], events.persona_summary, inputs=[persona, voice], outputs=summary, show_progress="hidden")
        role.change(events.role_counter, inputs=role, outputs=role_count, show_progress="hidden")
        voice.change(lambda: gr.update(visible=False, value=None), outputs=preview_audio, show_progress="hidden")
        preview.click(functools.partial(events.preview_voice, service), inputs=[voice, custom_voice], outputs=preview_audio,
                      api_name="preview_voice", concurrency_limit=PREVIEWS_AT_ONCE).success(
            lambda: gr.update(visible=True), outputs=preview_audio, show_progress="hidden")

        def upload(voice_clip: Any, consent: Any, custom_voice: Any, heard: Any, request: gr.Request) -> Upload:
            """A voice clip (5 to 30 s of speech) becomes this session's custom voice, once `consent` is true."""
            return events.upload_voice(service, voice_clip, consent, custom_voice, heard, request.session_hash)

        upload_args = {"inputs": [clip, consent, custom_voice, custom_heard],
                       "outputs": [voice_status, voice_in_use, custom_voice, custom_heard, upload_outcome]}
        shown = {"inputs": upload_outcome, "outputs": [voice, clip, voice_in_use], "show_progress": "hidden"}
        clip.upload(upload, api_name="upload_voice", **upload_args).then(events.show_upload, **shown)
        clip.stop_recording(upload, **upload_args).then(events.show_upload, **shown)
        consent.change(upload, **upload_args).then(events.show_upload, **shown)  # ticked after the upload: the clip applies now
        webrtc.stream(ConversationHandler(calls), inputs=[webrtc, *call_inputs.values()], outputs=[webrtc],
                      concurrency_limit=max_sessions + MAX_OPENING + SPARE_CONNECTIONS)
        webrtc.start_recording(lambda: (gr.update(visible=False), gr.update(visible=False)), outputs=[recording, transcript_file])
        files = {"inputs": [webrtc, owner], "outputs": [recording, transcript_file], "show_progress": "hidden"}
        webrtc.stop_recording(functools.partial(events.call_files, service), **files)  # the page stopped the call
        files_trigger.click(functools.partial(events.call_files, service), **files)  # the server ended it (web/call_page.js)
        offline_run.click(events.check_offline_input, inputs=offline_in, outputs=None).success(
            functools.partial(events.generate_offline, service), inputs=[offline_in, role, voice, custom_voice, consent, *sampling],
            outputs=[offline_agent, offline_mix, offline_text, offline_files], api_name="generate_offline",
            concurrency_limit=offline_runs(max_sessions))  # the rest wait in Gradio's queue, and the page says so

        def voices() -> list[VoiceInfo]:
            """The voices of the loaded checkpoint: `name` (what `voice` takes) and `label` (what it sounds like)."""
            return events.list_voices(service)

        def persona_presets() -> list[PersonaInfo]:
            """The page's persona presets: `name`, `prompt` (the role prompt) and `voice` (suggested)."""
            return events.list_personas(personas)

        api_endpoint(demo, voices, "voices")
        api_endpoint(demo, persona_presets, "personas")
        gr.Timer(STATUS_EVERY_S).tick(functools.partial(events.status_markdown, service), outputs=status, show_progress="hidden")
        voices_timer = gr.Timer(STATUS_EVERY_S, active=not service.status.ready)
        voices_timer.tick(functools.partial(events.checkpoint_voices, service), inputs=voice, outputs=[voice, voices_timer],
                          show_progress="hidden")
        hide_internal_events(demo)
    service.when_ready(functools.partial(publish_checkpoint_voices, demo, voice, summary, persona, voices_timer, service))
    return demo


def publish_checkpoint_voices(demo: gr.Blocks, voice: gr.Dropdown, summary: gr.HTML, persona: gr.Dropdown,
                              timer: gr.Timer, service: CallService) -> None:
    """Once loaded, the voice list (of pages opened from now on, and of the API) is the checkpoint's,
    and those pages wait for no list (`timer` off). Gradio computes its page config and API
    description once; both are refreshed here."""
    timer.active = False
    names = service.voice_names()
    voice.choices = voice_choices(names)
    if voice.value not in names:
        voice.value = names[0]
    summary.value = events.persona_summary(persona.value, voice.value)
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


def open_service(args: argparse.Namespace) -> tuple[CallService, str]:
    """The page's service, and a banner for the page ("": none). With `--engine-url`, the engines
    of a cluster (nothing here imports torch); else a model here, the tiny test model when no
    model was named and there is no CUDA GPU (`on_the_tiny_model`), so that a laptop gets a
    working page."""
    if args.engine_url:
        from personaplex.serve.remote import RemoteService

        return RemoteService(args.engine_url), ""
    try:
        from personaplex.serve.service import Service, Settings, on_the_tiny_model
    except ImportError as exc:  # a page-only install (requirements-front.txt): no torch here
        raise SystemExit(f"no model can run here ({exc}): install requirements.txt, or give --engine-url "
                         "ws://HOST:PORT/api/chat (PERSONAPLEX_ENGINE_URL) to send the calls to an engine cluster") from exc

    asked = Settings(args.checkpoint, args.hf_repo, args.config, args.device, args.max_sessions, args.weights, args.kv_cache)
    tiny = on_the_tiny_model(asked, TINY_CHECKPOINT)
    if tiny is None:
        return Service(asked), ""
    logger.info("no CUDA GPU: the page runs on the tiny test model in %s", TINY_CHECKPOINT)
    return Service(tiny), TINY_BANNER


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
    p.add_argument("--weights", choices=WEIGHTS, default=env("WEIGHTS", "auto"),
                   help="the LM's weights: 8 bits halve them (auto: bf16 where 8 conversations fit beside them, else int8)")
    p.add_argument("--kv-cache", choices=KV_FORMATS, default=env("KV_CACHE", "bf16"),
                   help="each conversation's KV cache: fp8 halves it")
    p.add_argument("--time-limit", type=float, default=float(env("TIME_LIMIT", "600")), help="seconds per call (0: none)")
    p.add_argument("--idle-timeout", type=float, default=float(env("IDLE_TIMEOUT", str(REALTIME.idle_timeout_s))),
                   help="seconds without audio from the caller before a call is closed")
    p.add_argument("--engine-url", default=env("ENGINE_URL"),
                   help="run no model here: send every call to the engine cluster at ws://HOST:PORT/api/chat")
    p.add_argument("--ssl-certfile", help="serve https and wss with this certificate (NVIDIA's web client needs wss)")
    p.add_argument("--ssl-keyfile", help="the certificate's key")
    args = p.parse_args(argv)
    for name, value, known in (("WEIGHTS", args.weights, WEIGHTS), ("KV_CACHE", args.kv_cache, KV_FORMATS)):
        if value not in known:  # (argparse checks what is typed, not the environment's default)
            p.error(f"PERSONAPLEX_{name}={value!r}: use one of {', '.join(known)}")
    return args


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
    service, banner = open_service(args)
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
