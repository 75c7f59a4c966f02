"""Strangers who try to take the server down, against the app as the README starts it (tiny
checkpoint, 4 conversations): ghost subscriptions and ghost offers, 10 MB values, uploads, files
on disk, another page steering a call, bad values to every public endpoint, and long offline
runs beside a live call. Each asserts what a person using the page gets meanwhile."""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import stat
import tempfile
import time
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest

from .helpers import ROOT, RunningApp, encode_audio_file, tone

VOICE = {"voice": "TESTV0"}


@pytest.fixture(scope="module")
def files_dir():
    with tempfile.TemporaryDirectory(prefix="hostile-") as folder:
        yield Path(folder)


@pytest.fixture(scope="module")
def app(files_dir):
    """The app with its own temporary folders (Gradio's and its own), so that what it writes can be listed."""
    (files_dir / "gradio").mkdir()
    (files_dir / "tmp").mkdir()
    running = RunningApp(max_sessions=4, env={"GRADIO_TEMP_DIR": str(files_dir / "gradio"), "TMPDIR": str(files_dir / "tmp")})
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


async def load_page(http: httpx.AsyncClient, url: str, client) -> tuple[object, str, float]:
    """A page as a browser opens it: the page, its config, its load events. (page, session, seconds)."""
    started = time.monotonic()
    (await http.get(url + "/")).raise_for_status()
    page = client.Page((await http.get(f"{url}/config")).json())
    session = secrets.token_hex(6)
    await client._load_page(http, url, page, session)
    return page, session, time.monotonic() - started


async def join(http: httpx.AsyncClient, url: str, page, dep: dict, session: str, call_id: str, values: dict) -> httpx.Response:
    body = {"data": page.inputs(dep, call_id, values), "fn_index": dep["id"], "session_hash": session,
            "trigger_id": page.webrtc, "event_data": None}
    return await http.post(f"{url}/gradio_api/queue/join", json=body)


def test_no_event_of_a_call_holds_the_queue_and_40_ghost_subscriptions_change_nothing(app, client, speech):
    """fastrtc's page-update event for a made-up call never ended: 40 of them filled Gradio's 40
    workers. The page's updates now travel on the call's own data channel: no event of the page
    lasts, and whatever strangers subscribe to, pages load and calls get their updates."""
    config = httpx.get(f"{app.url}/config").json()
    assert not [d["id"] for d in config["dependencies"] if d["types"]["generator"]]  # nothing streams through the queue

    async def scenario():
        async with httpx.AsyncClient(timeout=60) as http:
            page = client.Page(config)
            ghosts = [d for d in config["dependencies"] if page.webrtc in d["inputs"]]  # every event that names a call
            streams = []
            for _ in range(40):
                session = secrets.token_hex(6)
                for dep in ghosts:
                    await join(http, app.url, page, dep, session, secrets.token_hex(8), {})
                streams.append(asyncio.ensure_future(http.get(f"{app.url}/gradio_api/queue/data", params={"session_hash": session})))
            _, _, load_s = await load_page(http, app.url, client)
            call = await client.converse(app.url, speech, 4.0, VOICE)
            for stream in streams:
                stream.cancel()
            return load_s, call

    load_s, call = asyncio.run(scenario())
    assert load_s < 10.0, load_s
    assert not call.refused and call.output_updates > 0 and "engine tick" in call.details


def test_offers_that_never_complete_ice_do_not_keep_a_caller_out(app, client, speech):
    from aiortc import RTCPeerConnection
    from aiortc.mediastreams import AudioStreamTrack

    async def ghost(http: httpx.AsyncClient, page) -> None:
        pc = RTCPeerConnection()
        pc.createDataChannel("text")
        pc.addTrack(AudioStreamTrack())
        await pc.setLocalDescription(await pc.createOffer())
        body = {"session_hash": secrets.token_hex(6), "component_id": page.webrtc, "fn_name": "offer",
                "data": {"sdp": pc.localDescription.sdp, "type": "offer", "webrtc_id": secrets.token_hex(8)}}
        await http.post(f"{app.url}/gradio_api/component_server/", json=body)
        await pc.close()  # gone without a word: the server waits for ICE that never comes

    async def scenario():
        async with httpx.AsyncClient(timeout=30) as http:
            page = client.Page((await http.get(f"{app.url}/config")).json())
            await asyncio.gather(*(ghost(http, page) for _ in range(8)))
        started = time.monotonic()
        call = await client.converse(app.url, speech, 4.0, VOICE)
        return call, started

    call, _started = asyncio.run(scenario())
    assert not call.refused and call.connected_after_s is not None and call.connected_after_s < 5.0
    assert call.first_audio_after_s is not None and call.recording_url


def test_requests_carrying_10_mb_values_are_refused_at_the_door_and_leave_memory_flat(app):
    before = app.rss_mb()
    config = httpx.get(f"{app.url}/config").json()
    preview = next(d for d in config["dependencies"] if d["api_name"] == "preview_voice")
    refusals = set()
    with httpx.Client(timeout=60) as http:
        for _ in range(40):
            body = {"data": ["x" * 10 * 1024 * 1024, ""], "fn_index": preview["id"], "session_hash": secrets.token_hex(6)}
            response = http.post(f"{app.url}/gradio_api/queue/join", json=body)
            refusals.add((response.status_code, response.json()["detail"]))
    assert refusals == {(413, "the request is 10240 KB; requests with values are limited to 256 KB (upload files instead)")}
    assert app.rss_mb() - before < 100
    assert len(app.output()) < 1_000_000  # and the log did not take them in either


def test_what_the_app_writes_is_its_own(app, client, speech, files_dir):
    """Recordings, uploads and Gradio's copies of them: folders 0700, files 0600."""
    call = asyncio.run(client.converse(app.url, speech, 3.0, VOICE))
    assert call.recording_url and asyncio.run(client.fetch(call.recording_url))
    with httpx.Client(timeout=30) as http:
        clip = (ROOT / "examples" / "voice_sample.wav").read_bytes()
        assert http.post(f"{app.url}/gradio_api/upload", files={"files": ("clip.wav", clip)}).status_code == 200
    paths = [p for root in (files_dir / "gradio", files_dir / "tmp") for p in root.rglob("*")]
    assert any(p.name == "call.wav" for p in paths) and any(p.name == "clip.wav" for p in paths)
    modes = {(p.is_dir(), stat.S_IMODE(p.stat().st_mode)) for p in paths}
    assert modes <= {(True, 0o700), (False, 0o600)}, sorted(f"{p}: {oct(stat.S_IMODE(p.stat().st_mode))}" for p in paths
                                                            if stat.S_IMODE(p.stat().st_mode) not in (0o700, 0o600))


def test_another_page_cannot_mute_or_steer_a_call(app, client, speech):
    """Page B knows page A's call id (the probe's premise): it tries to mute A's call, to take
    its updates and to stop them. A's microphone keeps reaching the model, its page keeps its updates."""
    loud = np.concatenate([speech] * 3)

    async def scenario():
        result = client.CallResult(audio=np.zeros(0))
        call = asyncio.ensure_future(client.converse(app.url, loud, 9.0, VOICE, result=result))
        while not result.webrtc_id or result.connected_after_s is None:
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.0)
        updates_before = result.output_updates
        async with httpx.AsyncClient(timeout=30) as http:
            page, session, _ = await load_page(http, app.url, client)
            mute_id = next(c["id"] for c in httpx.get(f"{app.url}/config").json()["components"]
                           if c.get("props", {}).get("elem_id") == "mute")
            config = httpx.get(f"{app.url}/config").json()
            steering = [d for d in config["dependencies"] if page.webrtc in d["inputs"] and d["targets"][0][0] == mute_id]
            answers = [(await join(http, app.url, page, dep, session, result.webrtc_id, {"mute": True})).status_code
                       for dep in steering]
            quit_answer = (await http.post(f"{app.url}/gradio_api/component_server/", json={
                "session_hash": session, "component_id": page.webrtc, "fn_name": "quit_output_stream",
                "data": {"webrtc_id": result.webrtc_id}})).json()
        after = time.monotonic()
        done = await call
        return done, steering, answers, quit_answer, updates_before, after

    done, steering, answers, quit_answer, updates_before, _ = asyncio.run(scenario())
    assert steering and answers == [200] * len(steering)  # accepted as any event is, and dropped
    assert quit_answer == {"success": True} and done.output_updates > updates_before + 5
    with wave.open(io.BytesIO(asyncio.run(client.fetch(done.recording_url)))) as w:
        frames = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).reshape(-1, 2)
    user = frames[:, 0].astype(np.float32) / 32768
    late = user[-4 * 24000 : -1 * 24000]  # seconds 5 to 8: after page B's attempt
    assert np.sqrt(np.mean(late**2)) > 0.01  # the model still hears A's microphone


BAD_VALUES = [None, 123, -1, 1e308, "NaN", [], {}, ["x"], {"a": 1}, {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}},
              {"path": "../../../etc/shadow", "meta": {"_type": "gradio.FileData"}, "orig_name": "x.wav"}, "x" * 200_000, True]


def test_every_bad_value_to_the_api_gets_a_message(app, client):
    config = httpx.get(f"{app.url}/config").json()
    public = [d for d in config["dependencies"] if d["show_api"] and d["api_name"]]
    assert {d["api_name"] for d in public} == {"generate_offline", "upload_voice", "preview_voice", "voices", "personas"}
    page = client.Page(config)
    log_before = len(app.output())

    async def scenario():
        answers = []
        async with httpx.AsyncClient(timeout=60) as http:
            for dep in public:
                good = [page.values.get(i) for i in dep["inputs"]]
                cases = [[], good[: len(good) // 2], [*good, 1, 2]]
                cases += [[*good[:i], bad, *good[i + 1 :]] for i in range(len(good)) for bad in BAD_VALUES]
                for data in cases:
                    session = secrets.token_hex(6)
                    joined = await http.post(f"{app.url}/gradio_api/queue/join",
                                             json={"data": data, "fn_index": dep["id"], "session_hash": session})
                    if joined.status_code != 200:
                        answers.append((dep["api_name"], joined.status_code, joined.json().get("detail")))
                        continue
                    event_id = joined.json()["event_id"]
                    async with http.stream("GET", f"{app.url}/gradio_api/queue/data", params={"session_hash": session}) as r:
                        async for line in r.aiter_lines():
                            message = json.loads(line[5:]) if line.startswith("data:") else {}
                            if message.get("msg") == "process_completed" and message.get("event_id") == event_id:
                                error = None if message["success"] else message["output"].get("error")
                                answers.append((dep["api_name"], "ok" if message["success"] else "error", error))
                                break
        return answers

    answers = asyncio.run(scenario())
    silent = [a for a in answers if a[1] != "ok" and not a[2]]
    assert len(answers) > 150 and silent == [], silent[:10]
    assert "Traceback" not in app.output()[log_before:]


def test_a_live_call_is_admitted_while_four_long_offline_runs_are_in_progress(app, client, speech, tmp_path):
    """Offline runs take at most a share of the slots (one of four here); the others wait in the
    queue, and are told so. Runs last, so that the long runs left behind end with the app."""
    gradio_client = pytest.importorskip("gradio_client")
    from gradio_client.utils import Status

    minutes = tone(600.0, 48_000, freq=220.0)  # a 10-minute recording, small as Opus
    clip = encode_audio_file(tmp_path / "ten_minutes.ogg", minutes, 48_000, "libopus")
    api = gradio_client.Client(app.url, verbose=False)
    jobs = [api.submit(gradio_client.handle_file(str(clip)), "", "TESTV0", False, 0.7, 25, 0.8, 250, 1, False,
                       api_name="/generate_offline") for _ in range(4)]
    deadline, codes = time.monotonic() + 60, []
    while time.monotonic() < deadline:  # each job uploads its clip, joins the queue, and one of them runs
        statuses = [j.status() for j in jobs]
        codes = sorted(str(s.code) for s in statuses)
        if codes.count(str(Status.IN_QUEUE)) == 3 and len({s.code for s in statuses} - {Status.IN_QUEUE}) == 1:
            break
        time.sleep(0.2)
    waiting = [s for s in statuses if s.code is Status.IN_QUEUE]
    call = asyncio.run(client.converse(app.url, speech, 4.0, VOICE))
    assert not call.refused and call.first_audio_after_s is not None and call.output_updates > 0
    assert len(waiting) == 3 and all(s.rank is not None for s in waiting), codes  # the page shows their place in the queue
    for job in jobs:
        job.cancel()


def test_after_all_of_it_the_log_has_no_traceback(app):
    """Every attack above was answered in words: nothing the strangers sent reached the log as a fault."""
    assert "Traceback" not in app.output(), app.output()[-3000:]
