"""Hostile clients: how well the app as the README starts it holds up against anonymous abusive
clients (no browser, no login: anyone who can load the page can send these).

    python -m benchmarks.probe --json probe.json [--checks ghost_offers,uploads] [--ticks 900]

The server runs the tiny checkpoint on the CPU with 4 conversation slots, in a subprocess whose
GRADIO_TEMP_DIR and TMPDIR are fresh folders made here (so that file modes and disk use can be
read, and the app's own file store, a personaplex-files-* folder in its temp dir, is its own and
not another process's in /tmp), and whose log is kept (its path is in the JSON). Memory is the
server process's resident set (VmRSS, read from /proc), with a baseline after a short warm-up
call at each start; the app is restarted before the checks that can leave it broken. Every
check returns its figures (or
{"error": ...}) and the JSON file is rewritten after each, so a killed run keeps what it had:

    ghost_subscriptions  40 page-update subscriptions for made-up calls, then a page load and a real call
    ghost_offers         8 WebRTC offers that never complete ICE, then how long until a real call gets in
    big_strings          40 requests carrying a 10 MB string; the server's memory then and a minute later
    page_ticks           one page's status ticks (half a page-hour), then 200 new sessions: memory per each
    uploads              10 uploads of 99 MB of random bytes: how many are kept, and the disk they use
    offline_vs_live      4 offline runs of a 10-minute clip, then a live call: is it admitted?
    file_modes           the modes of every file and folder the app and Gradio wrote after a call and an upload
    foreign_call         a second page with someone else's call id: can it mute it, take its updates, stop them?
    bad_values           every API endpoint with each argument replaced by junk: errors with and without a message

The calls are the aiortc client of examples/ (the browser's exact signalling); the other
requests are Gradio's own routes (queue/join and its event stream, component_server, upload).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import copy
import datetime
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
from gradio_client.utils import apply_diff

from benchmarks.soak import App, load_client, rss_mb

logger = logging.getLogger("benchmarks.probe")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny" / "checkpoint"
MAX_SESSIONS = 4
APP_ARGS = f"--checkpoint {TINY} --config {TINY / 'tiny_config.json'} --device cpu --max-sessions {MAX_SESSIONS}"
VOICE = "TESTV0"
SPEECH = ROOT / "examples" / "user_question.wav"
MB = 2**20
YOU_SPEAKING = "<div class='who speaking'><span class='name'>You</span>"
FILE_TYPES = ("audio", "file", "image", "video")  # components whose value is a FileData dict


# --- the app ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProbeApp(App):
    """`python app.py` as soak.App starts it, with a fresh GRADIO_TEMP_DIR and a kept log."""

    def __init__(self, port: int, extra: str, log: Path) -> None:  # (soak.App's __init__ has no environment)
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.gradio_temp = Path(tempfile.mkdtemp(prefix="probe-gradio-"))
        self.tmp = Path(tempfile.mkdtemp(prefix="probe-tmp-"))  # its system temp dir: where its file store goes
        self.started_at = time.time()
        self.exit_status: int | None = None
        self.left_behind: list[str] = []
        env = {**os.environ, "GRADIO_TEMP_DIR": str(self.gradio_temp), "GRADIO_ANALYTICS_ENABLED": "False",
               "TMPDIR": str(self.tmp), "PYTHONUNBUFFERED": "1"}
        args = [sys.executable, str(ROOT / "app.py"), "--port", str(port), *extra.split()]
        self.command = " ".join(args[1:])
        with log.open("w") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss(self) -> float:
        return round(rss_mb(self.process.pid), 1)

    def log_size(self) -> int:
        return self.log.stat().st_size

    def log_since(self, offset: int) -> str:
        with self.log.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def stores(self) -> list[Path]:
        """The app's own file store (personaplex.runtime.recording.FileStore: a personaplex-files-* folder)."""
        return sorted(p for p in self.tmp.glob("personaplex-files-*") if p.is_dir())

    def stop(self) -> None:
        if self.alive():
            self.process.terminate()  # the app deletes its own files on SIGTERM
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.exit_status = self.process.returncode
        self.left_behind = [p.name for p in self.tmp.iterdir()]  # what the app did not delete on its way out
        shutil.rmtree(self.gradio_temp, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class Ctx:
    """What every check gets: the running app, its page's /config, the client, a work folder."""

    args: argparse.Namespace
    client: ModuleType
    speech: np.ndarray  # 48 kHz float32, what the real calls say
    work: Path
    log_dir: Path
    app: ProbeApp | None = None
    config: dict = field(default_factory=dict)
    starts: list[dict] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.app is not None
        return self.app.url

    @property
    def page(self) -> Any:
        return self.client.Page(self.config)

    def restart(self, reason: str) -> dict:
        """A fresh app, ready, its page config read, a warm-up call made; the RSS baseline."""
        self.stop()
        self.app = ProbeApp(self.args.port or free_port(), APP_ARGS, self.log_dir / f"app-{len(self.starts) + 1}.log")
        self.app.wait_ready()
        at_ready = self.app.rss()
        call = asyncio.run(self.client.converse(self.url, self.speech, 3.0, {"voice": VOICE}))  # warm-up
        time.sleep(1)
        self.config = httpx.get(f"{self.url}/config", timeout=30).json()  # (the voice list changes once loaded)
        start = {"before": reason, "log": str(self.app.log), "gradio_temp_dir": str(self.app.gradio_temp),
                 "tmpdir": str(self.app.tmp),
                 "rss_mb_ready": at_ready, "rss_mb_after_warmup": self.app.rss(),
                 "warmup_call_ok": call.connected_after_s is not None and not call.refused}
        self.starts.append(start)
        logger.info("app up at %s (RSS %.0f MB after warm-up)", self.url, start["rss_mb_after_warmup"])
        return start

    def stop(self) -> None:
        """Stop the app; its start's record gets its exit status and what it left in its temp dir."""
        if self.app is not None:
            self.app.stop()
            if self.starts:
                self.starts[-1].update(exit_status=self.app.exit_status, left_in_tmpdir=self.app.left_behind)
            self.app = None


# --- Gradio's routes --------------------------------------------------------------------------
def component(config: dict, cid: int | None) -> dict:
    return next((c for c in config["components"] if c["id"] == cid), {})


def find_dep(config: dict, event: str, *, ctype: str | None = None, elem_id: str | None = None) -> dict | None:
    """The first dependency triggered by `event` on a component of type `ctype` / with `elem_id`."""
    for dep in config["dependencies"]:
        for cid, name in dep["targets"]:
            c = component(config, cid)
            if name == event and (ctype is None or c.get("type") == ctype) and (
                    elem_id is None or c.get("props", {}).get("elem_id") == elem_id):
                return dep
    return None


def trigger_of(dep: dict) -> int | None:
    return next((cid for cid, _ in dep["targets"] if cid is not None), None)


async def join(http: httpx.AsyncClient, url: str, dep: dict, data: list, session: str,
               trigger: int | None = None) -> tuple[int, Any]:
    """POST queue/join; (HTTP status, the answer's JSON or text)."""
    body = {"data": data, "fn_index": dep["id"], "session_hash": session,
            "trigger_id": trigger if trigger is not None else trigger_of(dep), "event_data": None}
    r = await http.post(f"{url}/gradio_api/queue/join", json=body)
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, r.text[:500]


async def completed(http: httpx.AsyncClient, url: str, session: str, event_id: str, timeout: float = 30.0) -> dict:
    """The event's process_completed (or unexpected_error) message from the session's stream;
    {"msg": "timeout"} or {"msg": "stream_ended"} if none came."""
    async def read() -> dict:
        async with http.stream("GET", f"{url}/gradio_api/queue/data", params={"session_hash": session},
                               timeout=httpx.Timeout(30, read=None)) as r:
            if r.status_code != 200:
                return {"msg": "stream_refused", "status": r.status_code}
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                if msg.get("msg") == "unexpected_error" or (
                        msg.get("msg") == "process_completed" and msg.get("event_id") == event_id):
                    return msg
        return {"msg": "stream_ended"}

    try:
        return await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        return {"msg": "timeout"}


async def run_event(http: httpx.AsyncClient, url: str, dep: dict, data: list, session: str | None = None,
                    trigger: int | None = None, timeout: float = 30.0) -> dict:
    """Join an event and wait for its end: status, seconds, and how it ended (`outcome`)."""
    session = session or secrets.token_hex(6)
    started = time.monotonic()
    status, body = await join(http, url, dep, data, session, trigger)
    if status != 200 or not isinstance(body, dict) or "event_id" not in body:
        return {"status": status, "body": str(body)[:300], "outcome": f"join_{status}",
                "seconds": round(time.monotonic() - started, 3)}
    msg = await completed(http, url, session, body["event_id"], timeout)
    return {"status": status, "outcome": outcome(msg), "error": error_text(msg),
            "seconds": round(time.monotonic() - started, 3), "message": msg}


def outcome(msg: dict) -> str:
    if msg.get("msg") != "process_completed":
        return str(msg.get("msg"))
    if msg.get("success"):
        return "success"
    return "error_null" if error_text(msg) is None else "error_message"


def error_text(msg: dict) -> str | None:
    if msg.get("msg") == "unexpected_error":
        return msg.get("message")
    error = (msg.get("output") or {}).get("error")
    return None if error is None else str(error)


async def load_page(http: httpx.AsyncClient, url: str, config: dict, session: str, timeout: float = 60.0) -> float | str:
    """A browser opening the page: GET /, GET /config, the load events; seconds, or "timed out"."""
    started = time.monotonic()

    async def go() -> None:
        (await http.get(f"{url}/")).raise_for_status()
        (await http.get(f"{url}/config")).raise_for_status()
        deps = [d for d in config["dependencies"] if any(name == "load" for _, name in d["targets"])]
        ids = []
        for dep in deps:
            status, body = await join(http, url, dep, [], session, None)
            if status != 200:
                raise RuntimeError(f"load event {dep['id']}: HTTP {status} {body}")
            ids.append(body["event_id"])
        for event_id in ids:  # (each `completed` opens the session's stream until its event is done)
            msg = await completed(http, url, session, event_id, timeout)
            if msg.get("msg") != "process_completed":
                raise TimeoutError(str(msg.get("msg")))

    try:
        await asyncio.wait_for(go(), timeout)
    except TimeoutError:
        return "timed out"
    return round(time.monotonic() - started, 3)


async def upload(http: httpx.AsyncClient, url: str, path: Path, name: str | None = None) -> tuple[int, str]:
    """A multipart upload as gradio_client does it (form field `files`); (status, body)."""
    with path.open("rb") as f:
        r = await http.post(f"{url}/gradio_api/upload", files=[("files", (name or path.name, f.read()))],
                            timeout=httpx.Timeout(300))
    return r.status_code, r.text


def file_data(path: str, name: str = "clip.wav") -> dict:
    return {"path": path, "orig_name": name, "meta": {"_type": "gradio.FileData"}}


async def real_call(ctx: Ctx, seconds: float, result: Any = None) -> dict:
    """A real call through the client: admitted (connected, not refused), or the refusal's text."""
    started = time.monotonic()
    try:
        r = await asyncio.wait_for(ctx.client.converse(ctx.url, ctx.speech, seconds, {"voice": VOICE}, result=result),
                                   seconds + 30)
    except RuntimeError as exc:  # the offer itself was refused (the app's answer is in the message)
        return {"admitted": False, "refused_text": str(exc)[:400], "seconds": round(time.monotonic() - started, 2)}
    except Exception as exc:
        return {"admitted": False, "error": f"{type(exc).__name__}: {exc}"[:400],
                "seconds": round(time.monotonic() - started, 2)}
    return {"admitted": r.connected_after_s is not None and not r.refused, "connected_after_s": r.connected_after_s,
            "first_audio_after_s": r.first_audio_after_s, "refused": r.refused, "ended": r.ended,
            "received_s": round(r.audio.size / ctx.client.RATE, 2), "page_updates": r.output_updates,
            "seconds": round(time.monotonic() - started, 2)}


def write_wav(path: Path, pcm: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.astype(np.int16).tobytes())


def speech_24k() -> tuple[np.ndarray, int]:
    with wave.open(str(SPEECH)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16), w.getframerate()


def clip_of(seconds: float, path: Path) -> Path:
    """examples/user_question.wav looped or cut to `seconds` (mono int16 at its own rate)."""
    pcm, rate = speech_24k()
    n = int(seconds * rate)
    write_wav(path, np.tile(pcm, n // pcm.size + 1)[:n], rate)
    return path


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


# --- the checks -------------------------------------------------------------------------------
async def ghost_subscriptions(ctx: Ctx, count: int = 40) -> dict:
    config, url, page = ctx.config, ctx.url, ctx.page
    webrtc = next((c["id"] for c in config["components"] if c.get("type") == "webrtc"), None)
    dep = find_dep(config, "state_change", ctype="webrtc")
    if dep is None:
        return {"state_change_dependency": None, "note": "the page has no page-update event (state_change) to subscribe to"}
    ghosts: list[dict] = [{} for _ in range(count)]

    async def ghost(record: dict) -> None:
        session, call_id = secrets.token_hex(6), secrets.token_hex(8)
        status, body = await join(http, url, dep, page.inputs(dep, call_id, {}), session, webrtc)
        record.update(status=status, body=str(body)[:200], messages=0, ended_at_once=False)
        if status != 200:
            return
        opened = time.monotonic()
        async with http.stream("GET", f"{url}/gradio_api/queue/data", params={"session_hash": session},
                               timeout=httpx.Timeout(30, read=None)) as r:
            record["stream_status"] = r.status_code
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    record["messages"] += 1
                    record["last_msg"] = json.loads(line[5:]).get("msg")
        record["ended_at_once"] = time.monotonic() - opened < 5.0
        record["stream_ended_after_s"] = round(time.monotonic() - opened, 2)

    limits = httpx.Limits(max_connections=count + 20, max_keepalive_connections=count + 20)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        rss_before = ctx.app.rss()
        tasks = [asyncio.create_task(ghost(g)) for g in ghosts]
        await asyncio.sleep(5.5)
        page_load = await load_page(http, url, config, secrets.token_hex(6), 60.0)
        logger.info("page load with %d ghosts open: %s", count, page_load)
        call = await real_call(ctx, 6.0)
        rss_during = ctx.app.rss()
        still_open = sum(not t.done() for t in tasks)
        for t in tasks:
            t.cancel()
        failures = [repr(r) for r in await asyncio.gather(*tasks, return_exceptions=True)
                    if isinstance(r, Exception) and not isinstance(r, asyncio.CancelledError)]
        await asyncio.sleep(3)
        page_load_after = await load_page(http, url, config, secrets.token_hex(6), 15.0)  # did closing free them?
    return {
        "state_change_dependency": dep["id"], "subscriptions": count,
        "join_statuses": dict(collections.Counter(str(g.get("status")) for g in ghosts)),
        "join_body_first": ghosts[0].get("body"),
        "ended_at_once": sum(bool(g.get("ended_at_once")) for g in ghosts),
        "still_open_after_call": still_open, "messages_per_subscription": [g.get("messages") for g in ghosts],
        "last_messages": dict(collections.Counter(str(g.get("last_msg")) for g in ghosts)),
        "subscription_failures": failures[:3], "page_load_s": page_load, "call": call,
        "page_load_after_closing_s": page_load_after,
        "rss_mb_before": rss_before, "rss_mb_with_ghosts": rss_during, "rss_mb_after_closing": ctx.app.rss(),
    }


async def ghost_offers(ctx: Ctx, count: int = 8, patience_s: float = 40.0) -> dict:
    from aiortc import RTCPeerConnection

    url, page, client = ctx.url, ctx.page, ctx.client
    pcs = []
    for _ in range(count):  # ready before the first is sent, so that all go within a second
        pc = RTCPeerConnection()
        pc.createDataChannel("text")
        pc.addTrack(client.FileTrack(np.zeros(client.RATE, dtype=np.float32)))
        await pc.setLocalDescription(await pc.createOffer())
        pcs.append(pc)
    started = time.monotonic()

    async def offer(pc: Any) -> dict:
        body = {"session_hash": secrets.token_hex(6), "component_id": page.webrtc, "fn_name": "offer",
                "data": {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type,
                         "webrtc_id": secrets.token_hex(8)}}
        sent = time.monotonic() - started
        r = await http.post(f"{url}/gradio_api/component_server/", json=body)
        await pc.close()  # without a word to the server: it waits for ICE that never comes
        return {"sent_at_s": round(sent, 3), "status": r.status_code, "answered": "sdp" in r.text,
                "body": r.text[:200] if "sdp" not in r.text else "(an SDP answer)"}

    async with httpx.AsyncClient(timeout=30) as http:
        offers = await asyncio.gather(*(offer(pc) for pc in pcs))
    sent_within = round(time.monotonic() - started, 2)
    tries: list[dict] = []
    first = time.monotonic()
    admitted_after = None
    while time.monotonic() - first < patience_s:
        at = time.monotonic() - first
        call = await real_call(ctx, 5.0)
        tries.append({"at_s": round(at, 2), **call})
        if call["admitted"]:
            admitted_after = round(at + (call.get("connected_after_s") or 0.0), 2)
            break
        await asyncio.sleep(1.0)
    refusals = collections.Counter(t.get("refused_text") or t.get("ended") or t.get("error") or "?"
                                   for t in tries if not t["admitted"])
    return {
        "offers": count, "offers_sent_within_s": sent_within,
        "answers": dict(collections.Counter("sdp answer" if o["answered"] else o["body"] for o in offers)),
        "offer_statuses": dict(collections.Counter(str(o["status"]) for o in offers)),
        "real_call_admitted_after_s": admitted_after, "tries": len(tries), "patience_s": patience_s,
        "refusal_texts": dict(refusals), "last_try": tries[-1] if tries else None,
        "try_times_s": [t["at_s"] for t in tries],
    }


async def big_strings(ctx: Ctx, count: int = 40, via_call_route: int = 5, size: int = 10_000_000) -> dict:
    url, config = ctx.url, ctx.config
    dep = next((d for d in config["dependencies"] if d.get("api_name") == "preview_voice"), None)
    if dep is None:
        return {"preview_voice": None}
    big = "x" * size
    data = [big if component(config, cid).get("type") != "state" else None for cid in dep["inputs"]]
    rss_before, log_before = ctx.app.rss(), ctx.app.log_size()
    joined: list[dict] = []
    called: list[dict] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(120)) as http:
        for _ in range(count - via_call_route):
            r = await run_event(http, url, dep, data, timeout=60.0)
            joined.append({"status": r["status"], "outcome": r["outcome"], "seconds": r["seconds"],
                           "error_chars": len(r.get("error") or ""), "body": r.get("body")})
        log_after_joins = ctx.app.log_size()
        # The simple route of the API page (curl's), with the parameters the API page lists
        documented = (await http.get(f"{url}/gradio_api/info")).json()["named_endpoints"]["/preview_voice"]["parameters"]
        for _ in range(via_call_route):
            started = time.monotonic()
            r = await http.post(f"{url}/gradio_api/call/preview_voice", json={"data": [big] * len(documented)})
            row: dict[str, Any] = {"status": r.status_code, "body": r.text[:200] if r.status_code != 200 else None}
            if r.status_code == 200:
                event_id = r.json()["event_id"]
                try:
                    async with asyncio.timeout(60):
                        async with http.stream("GET", f"{url}/gradio_api/call/preview_voice/{event_id}") as s:
                            async for line in s.aiter_lines():
                                if line.startswith("event:"):
                                    row["event"] = line[6:].strip()
                                elif line.startswith("data:") and row.get("event") in ("complete", "error"):
                                    row["data"] = line[5:].strip()[:100]
                                    break
                except TimeoutError:
                    row["event"] = "timeout"
            row["seconds"] = round(time.monotonic() - started, 3)
            called.append(row)
    rss_after = ctx.app.rss()
    logger.info("big strings sent; RSS %.0f -> %.0f MB; waiting a minute", rss_before, rss_after)
    await asyncio.sleep(60)
    rss_later = ctx.app.rss()
    return {
        "string_bytes": size, "requests": count, "via_queue_join": len(joined), "via_call_route": len(called),
        "join_statuses": dict(collections.Counter(str(j["status"]) for j in joined)),
        "join_outcomes": dict(collections.Counter(j["outcome"] for j in joined)),
        "join_seconds": [j["seconds"] for j in joined], "error_chars_first": joined[0]["error_chars"] if joined else None,
        "join_body_first": joined[0].get("body") if joined else None,
        "call_route_documented_args": len(documented), "call_route": called,
        "rss_mb_before": rss_before, "rss_mb_right_after": rss_after, "rss_mb_60s_later": rss_later,
        "rss_growth_mb_60s_later": round(rss_later - rss_before, 1),
        "log_growth_bytes": ctx.app.log_size() - log_before, "log_growth_bytes_queue_join": log_after_joins - log_before,
        "log_growth_bytes_call_route": ctx.app.log_size() - log_after_joins,
    }


async def page_ticks(ctx: Ctx, new_sessions: int = 200) -> dict:
    url, config, ticks = ctx.url, ctx.config, ctx.args.ticks
    dep = find_dep(config, "tick", ctype="timer")
    if dep is None:
        return {"timer_tick": None}
    data = [component(config, cid).get("props", {}).get("value") for cid in dep["inputs"]]
    async with httpx.AsyncClient(timeout=30) as http:
        session = secrets.token_hex(6)
        page_load = await load_page(http, url, config, session)
        await asyncio.sleep(1)
        rss_before = ctx.app.rss()
        started = time.monotonic()
        seconds, outcomes = [], collections.Counter()
        for _ in range(ticks):
            r = await run_event(http, url, dep, data, session)
            seconds.append(r["seconds"])
            outcomes[r["outcome"]] += 1
        took = time.monotonic() - started
        await asyncio.sleep(2)
        rss_after_ticks = ctx.app.rss()
        logger.info("%d ticks in %.0f s; RSS %.1f -> %.1f MB", ticks, took, rss_before, rss_after_ticks)
        new_outcomes: collections.Counter = collections.Counter()
        for _ in range(new_sessions):
            new_outcomes[(await run_event(http, url, dep, data))["outcome"]] += 1
        await asyncio.sleep(2)
        rss_after_sessions = ctx.app.rss()
    return {
        "tick_dependency": dep["id"], "page_load_s": page_load, "ticks": ticks, "ticks_took_s": round(took, 1),
        "tick_s_median": round(float(np.median(seconds)), 4) if seconds else None,
        "tick_s_max": round(max(seconds), 3) if seconds else None, "tick_outcomes": dict(outcomes),
        "rss_mb_before": rss_before, "rss_mb_after_ticks": rss_after_ticks,
        "kb_per_tick": round((rss_after_ticks - rss_before) * 1024 / max(1, ticks), 2),
        "new_sessions": new_sessions, "new_session_outcomes": dict(new_outcomes), "rss_mb_after_new_sessions": rss_after_sessions,
        "kb_per_new_session": round((rss_after_sessions - rss_after_ticks) * 1024 / max(1, new_sessions), 2),
    }


async def uploads(ctx: Ctx, count: int = 10, size: int = 99 * MB) -> dict:
    url, temp = ctx.url, ctx.app.gradio_temp
    path = ctx.work / "clip.wav"
    with path.open("wb") as f:
        for _ in range(size // MB):
            f.write(os.urandom(MB))
    disk_before = tree_bytes(temp)
    rows = []
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(300)) as http:
            for i in range(count):
                with path.open("r+b") as f:  # a different file each time (Gradio keeps uploads by their hash)
                    f.write(i.to_bytes(8, "little") + os.urandom(8))
                started = time.monotonic()
                status, body = await upload(http, url, path)
                rows.append({"status": status, "body": body[:200], "seconds": round(time.monotonic() - started, 2)})
                logger.info("upload %d: HTTP %d in %.1f s", i + 1, status, rows[-1]["seconds"])
    finally:
        path.unlink(missing_ok=True)
    await asyncio.sleep(2)
    return {
        "uploads": count, "bytes_each": size, "accepted": sum(r["status"] == 200 for r in rows), "rows": rows,
        "gradio_temp_bytes_before": disk_before, "gradio_temp_bytes_after": tree_bytes(temp),
        "gradio_temp_mb_after": round(tree_bytes(temp) / MB, 1), "rss_mb_after": ctx.app.rss(),
    }


async def offline_vs_live(ctx: Ctx, runs: int = 4, clip_s: float = 600.0) -> dict:
    from gradio_client import Client, handle_file

    clip = clip_of(clip_s, ctx.work / "long_user.wav")
    gc = await asyncio.to_thread(Client, ctx.url, verbose=False)
    jobs = []
    try:
        for _ in range(runs):  # the README's parameters: clip, role, voice, consent, 4 sampling, seed, greedy
            jobs.append(await asyncio.to_thread(gc.submit, handle_file(str(clip)), "", VOICE, False, 0.7, 25, 0.8,
                                                250, 1, False, api_name="/generate_offline"))
        await asyncio.sleep(5)
        before = [str(j.status().code) for j in jobs]
        call = await real_call(ctx, 5.0)
        after = [{"code": str(s.code), "progress": [p.model_dump() if hasattr(p, "model_dump") else str(p)
                                                    for p in (s.progress_data or [])][-1:]}
                 for s in (j.status() for j in jobs)]
    finally:
        for j in jobs:
            try:
                j.cancel()
            except Exception as exc:
                logger.warning("could not cancel an offline job: %s", exc)
        await asyncio.to_thread(gc.close)
        clip.unlink(missing_ok=True)
    ctx.stop()  # the runs may go on in the server: the next check gets a fresh app
    stopped = ctx.starts[-1] if ctx.starts else {}
    return {"offline_runs": runs, "clip_s": clip_s, "jobs_before_call": before, "live_call": call,
            "jobs_after_call": after, "app_exit_status_on_sigterm": stopped.get("exit_status"),
            "app_left_in_tmpdir": stopped.get("left_in_tmpdir")}


def modes(root: Path) -> list[tuple[str, str]]:
    """(path relative to root, "dir 0o700" / "file 0o644") for root and everything under it."""
    rows = []
    for p in [root, *sorted(root.rglob("*"))]:
        try:
            st = p.lstat()
        except FileNotFoundError:
            continue
        kind = "dir" if p.is_dir() else "file"
        rows.append((str(p.relative_to(root.parent)), f"{kind} {oct(st.st_mode & 0o7777)}"))
    return rows


async def file_modes(ctx: Ctx) -> dict:
    url, app = ctx.url, ctx.app
    call = ctx.client.CallResult(audio=np.zeros(0, dtype=np.float32))
    admitted = await real_call(ctx, 3.0, result=call)
    fetched = None
    if call.recording_url:
        fetched = len(await ctx.client.fetch(call.recording_url))
    async with httpx.AsyncClient(timeout=60) as http:
        status, body = await upload(http, url, clip_of(2.0, ctx.work / "small.wav"))
    stores = app.stores()
    rows = modes(app.gradio_temp)
    store_rows = [r for s in stores for r in modes(s)]
    return {
        "call": admitted, "recording_url": call.recording_url, "recording_bytes_fetched": fetched,
        "upload_status": status, "upload_body": body[:200],
        "gradio_temp_dir": str(app.gradio_temp), "gradio_temp_modes": dict(collections.Counter(m for _, m in rows)),
        "gradio_temp_entries": rows[:60],
        "app_stores": [str(s) for s in stores], "app_store_modes": dict(collections.Counter(m for _, m in store_rows)),
        "app_store_entries": store_rows[:60],
        "umask_of_probe": oct(os.umask(os.umask(0o022))),
    }


async def follow_updates(http: httpx.AsyncClient, url: str, session: str, config: dict, dep: dict, got: dict) -> None:
    """Count a page-update subscription's messages, and keep what they would show (`saw_of_a`):
    the first output is whole, the next are Gradio's diffs of it."""
    names = [component(config, cid).get("props", {}).get("elem_id") for cid in dep["outputs"]]
    states: list[Any] | None = None
    async with http.stream("GET", f"{url}/gradio_api/queue/data", params={"session_hash": session},
                           timeout=httpx.Timeout(30, read=None)) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            msg = json.loads(line[5:])
            got["messages"] += 1
            got["last"] = msg.get("msg")
            data = (msg.get("output") or {}).get("data")
            if msg.get("msg") != "process_generating" or not data:
                continue
            got["generating"] += 1
            if len(got["first_data"]) < 3:
                got["first_data"].append(json.dumps(data)[:300])
            try:
                states = list(data) if states is None else [apply_diff(s, d) for s, d in zip(states, data)]
            except (KeyError, IndexError, TypeError, ValueError):
                continue
            shown = {n: v.get("value") if isinstance(v, dict) and v.get("__type__") == "update" else v
                     for n, v in zip(names, states)}
            got["saw_of_a"] = {n: str(v)[:200] for n, v in shown.items() if v not in (None, "", [])}


async def foreign_call(ctx: Ctx, call_s: float = 12.0, act_after_s: float = 3.0) -> dict:
    url, config, page, client = ctx.url, ctx.config, ctx.page, ctx.client
    mute = find_dep(config, "change", elem_id="mute")
    mute_id = next((c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "mute"), None)
    a = client.CallResult(audio=np.zeros(0, dtype=np.float32))
    started = time.monotonic()
    samples: list[dict] = []

    async def sample() -> None:
        while True:
            samples.append({"t": time.monotonic() - started, "updates": a.output_updates,
                            "audio_s": a.received_samples / client.RATE,
                            "caption_chars": sum(len(m.get("content", "")) for m in a.conversation),
                            "you_speaking": YOU_SPEAKING in a.live})
            await asyncio.sleep(0.25)

    looped = np.tile(ctx.speech, int(call_s * client.RATE / ctx.speech.size) + 2)
    call = asyncio.create_task(client.converse(url, looped, call_s, {"voice": VOICE}, result=a))
    sampler = asyncio.create_task(sample())
    b: dict[str, Any] = {}
    try:
        while a.connected_after_s is None and not call.done() and time.monotonic() - started < 15:
            await asyncio.sleep(0.05)
        await asyncio.sleep(act_after_s)
        acted = time.monotonic() - started
        async with httpx.AsyncClient(timeout=30) as http:
            session = secrets.token_hex(6)
            b["page_load_s"] = await load_page(http, url, config, session)
            if mute is not None:  # (a) the mute switch's change event, for A's call id
                r = await run_event(http, url, mute, page.inputs(mute, a.webrtc_id, {"mute": True}), session, mute_id)
                b["mute"] = {k: r.get(k) for k in ("status", "outcome", "error", "body")}
            else:
                b["mute"] = "no change event on the mute switch"
            # (b) A's page updates, subscribed to from B's page (if the page has such an event)
            sc = find_dep(config, "state_change", ctype="webrtc")
            got: dict[str, Any] = {"messages": 0, "generating": 0, "first_data": []}
            follower = None
            if sc is not None:
                status, body = await join(http, url, sc, page.inputs(sc, a.webrtc_id, {}), session, page.webrtc)
                got.update(status=status, body=str(body)[:200])
                follower = asyncio.create_task(follow_updates(http, url, session, config, sc, got))
            else:
                got["status"] = "no page-update event (state_change) to subscribe to"
            subscribed = time.monotonic() - started
            await asyncio.sleep(3.0)
            # (c) stop A's page updates
            quit_at = time.monotonic() - started
            r = await http.post(f"{url}/gradio_api/component_server/",
                                json={"session_hash": session, "component_id": page.webrtc, "fn_name": "quit_output_stream",
                                      "data": {"webrtc_id": a.webrtc_id}})
            b["quit_output_stream"] = {"status": r.status_code, "body": r.text[:200]}
            await asyncio.wait_for(asyncio.shield(call), call_s + 30)
            if follower is not None:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)
            b["subscription"] = got
    finally:
        sampler.cancel()
        if not call.done():
            call.cancel()
        await asyncio.gather(sampler, call, return_exceptions=True)

    def at(t: float, key: str) -> float:
        return next((s[key] for s in reversed(samples) if s["t"] <= t), 0)

    def between(t0: float, t1: float, key: str) -> float:
        return round(at(t1, key) - at(t0, key), 2)

    def speaking(t0: float, t1: float) -> float | None:
        rows = [s["you_speaking"] for s in samples if t0 <= s["t"] < t1]
        return round(sum(rows) / len(rows), 2) if rows else None

    end = samples[-1]["t"] if samples else 0
    return {
        "a_connected_after_s": a.connected_after_s, "b_acted_at_s": round(acted, 2), "b": b,
        "a_updates_3s_before": between(acted - 3, acted, "updates"),
        "a_updates_6s_after": between(acted, acted + 6, "updates"),
        "a_updates_subscribed_to_quit": between(subscribed, quit_at, "updates"),
        "a_updates_after_quit": between(quit_at, end, "updates"), "quit_to_end_s": round(end - quit_at, 2),
        "a_audio_s_3s_before": between(acted - 3, acted, "audio_s"),
        "a_audio_s_after_quit": between(quit_at, end, "audio_s"),
        "a_caption_chars_3s_before": between(acted - 3, acted, "caption_chars"),
        "a_caption_chars_after_quit": between(quit_at, end, "caption_chars"),
        "a_you_speaking_share_before": speaking(acted - 3, acted),
        "a_you_speaking_share_after_mute": speaking(acted + 1, quit_at),
        "a_ended": a.ended, "a_refused": a.refused, "a_page_updates_total": a.output_updates,
        "a_received_s": round(a.received_samples / client.RATE, 2),
    }


EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*)(?:Error|Exception)\b.*$", re.MULTILINE)  # a traceback's last line
BAD_VALUES: list[tuple[str, Any]] = [
    ("null", None), ("123", 123), ("-1", -1), ("1e308", 1e308), ("'NaN'", "NaN"), ("[]", []), ("{}", {}),
    ("['x']", ["x"]), ("{'a': 1}", {"a": 1}), ("file /etc/passwd", file_data("/etc/passwd", "passwd")),
    ("file made-up", None), ("300 KB string", "x" * 300_000), ("True", True),
]


async def bad_values(ctx: Ctx) -> dict:
    url, config, app = ctx.url, ctx.config, ctx.app
    deps = [d for d in config["dependencies"] if d.get("api_name") and d.get("show_api", True)]
    async with httpx.AsyncClient(timeout=60) as http:
        status, body = await upload(http, url, clip_of(6.0, ctx.work / "valid.wav"))
        if status != 200:
            return {"upload": {"status": status, "body": body[:200]}}
        valid_file = file_data(json.loads(body)[0])
        made_up = file_data(str(app.gradio_temp / secrets.token_hex(20) / "clip.wav"))
        log_before = app.log_size()
        rows = []
        for dep in deps:
            kinds = [component(config, cid) for cid in dep["inputs"]]
            base = []
            for c in kinds:
                props = c.get("props", {})
                value = valid_file if c.get("type") in FILE_TYPES else props.get("value")
                base.append(True if props.get("elem_id") == "consent" else value)  # consent given: the call goes deep
            params = [i for i, c in enumerate(kinds) if c.get("type") != "state"]
            cases: list[tuple[str, list]] = [("valid", base)]
            for i in params:
                name = kinds[i].get("props", {}).get("elem_id") or kinds[i].get("props", {}).get("label") or str(i)
                for label, value in BAD_VALUES:
                    data = copy.copy(base)
                    data[i] = made_up if label == "file made-up" else value
                    cases.append((f"{name}={label}", data))
            for label, data in (("no args", []), ("half the args", base[: len(base) // 2]), ("2 extra args", [*base, 1, 2])):
                if len(data) != len(base):
                    cases.append((label, data))
            for label, data in cases:
                r = await run_event(http, url, dep, data, timeout=60.0)
                rows.append({"endpoint": dep["api_name"], "case": label, "outcome": r["outcome"],
                             "error": (r.get("error") or r.get("body") or "")[:160], "seconds": r["seconds"]})
            logger.info("bad values: /%s done (%d cases so far)", dep["api_name"], len(rows))
        log = app.log_since(log_before)
    by_endpoint: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in rows:
        by_endpoint[r["endpoint"]][r["outcome"]] += 1
    return {
        "endpoints": [d["api_name"] for d in deps], "requests": len(rows),
        "outcomes": dict(collections.Counter(r["outcome"] for r in rows)),
        "by_endpoint": {k: dict(v) for k, v in by_endpoint.items()},
        "error_null_cases": [f"/{r['endpoint']} {r['case']}" for r in rows if r["outcome"] == "error_null"][:20],
        "valid_cases": [r for r in rows if r["case"] == "valid"],
        "messages_sample": sorted({r["error"] for r in rows if r["outcome"] == "error_message"})[:25],
        "log_tracebacks": log.count("Traceback"), "log_bytes": len(log.encode()),
        "log_exceptions": dict(collections.Counter(m[:120] for m in EXCEPTION_LINE.findall(log)).most_common(15)),
        "rows": rows,
    }


# name: (check, restart the app before it)
CHECKS: dict[str, tuple[Callable[[Ctx], Awaitable[dict]], bool]] = {
    "ghost_subscriptions": (ghost_subscriptions, False),
    "ghost_offers": (ghost_offers, True),
    "big_strings": (big_strings, True),
    "page_ticks": (page_ticks, True),
    "uploads": (uploads, False),
    "offline_vs_live": (offline_vs_live, True),
    "file_modes": (file_modes, True),
    "foreign_call": (foreign_call, False),
    "bad_values": (bad_values, False),
}
LIMIT_S = {"ghost_subscriptions": 150, "ghost_offers": 150, "big_strings": 300, "page_ticks": 300, "uploads": 300,
           "offline_vs_live": 180, "file_modes": 90, "foreign_call": 90, "bad_values": 480}


# --- the run ----------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    client = load_client()
    work = Path(tempfile.mkdtemp(prefix="probe-work-"))
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="probe-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(args, client, client.load_48k(str(SPEECH)), work, log_dir)
    result: dict[str, Any] = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
                              "app": {"command": f"python app.py {APP_ARGS} --port P", "voice": VOICE,
                                      "env": {"GRADIO_TEMP_DIR": "a fresh folder per start",
                                              "GRADIO_ANALYTICS_ENABLED": "False"},
                                      "log_dir": str(log_dir), "starts": ctx.starts},
                              "checks": {}}
    broken = True
    try:
        for name in args.checks:
            check, restart = CHECKS[name]
            figures: dict[str, Any] = {}
            try:
                if restart or broken or ctx.app is None or not ctx.app.alive():
                    figures["app_start"] = ctx.restart(name)
                logger.info("check %s", name)
                started = time.monotonic()
                figures.update(asyncio.run(asyncio.wait_for(check(ctx), LIMIT_S[name])))
                figures["check_s"] = round(time.monotonic() - started, 1)
                broken = ctx.app is None or not ctx.app.alive()
            except Exception as exc:
                logger.exception("check %s failed", name)
                figures["error"] = f"{type(exc).__name__}: {exc}"[:1000]
                broken = True
            if ctx.app is not None and not ctx.app.alive():
                figures["app_died"] = ctx.app.process.returncode
            result["checks"][name] = figures
            if args.json:
                args.json.write_text(json.dumps(result, indent=1, default=str))
    finally:
        ctx.stop()
        shutil.rmtree(work, ignore_errors=True)
        if args.json:  # with the last app's exit status
            args.json.write_text(json.dumps(result, indent=1, default=str))
    return result


def dig(result: dict, check: str, *keys: str) -> Any:
    value: Any = result["checks"].get(check)
    if value is None:
        return "not run"
    if "error" in value and keys and keys[0] not in value:
        return f"failed ({value['error'][:60]})"
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def call_text(call: Any) -> str:
    if not isinstance(call, dict):
        return str(call)
    if call.get("admitted"):
        return f"admitted, connected after {call['connected_after_s']:.2f} s, first audio after {call['first_audio_after_s']} s"
    return f"not admitted: {call.get('refused_text') or call.get('ended') or call.get('error')}"


def summary(result: dict) -> str:
    """The headline figures, a markdown table."""
    def modes_text(counts: Any) -> str:
        return ", ".join(f"{k}: {v}" for k, v in counts.items()) if isinstance(counts, dict) else str(counts)

    uploads_text = f"{dig(result, 'uploads', 'accepted')} of 10, {dig(result, 'uploads', 'gradio_temp_mb_after')} MB on disk"
    live = dig(result, "offline_vs_live", "live_call")
    b = dig(result, "foreign_call", "b")
    if isinstance(b, dict):
        mute = b.get("mute", {})
        sub = b.get("subscription", {})
        shares = (dig(result, "foreign_call", "a_you_speaking_share_before"),
                  dig(result, "foreign_call", "a_you_speaking_share_after_mute"))
        foreign = (f"mute: B's event {mute.get('outcome') if isinstance(mute, dict) else mute}, A's 'You speaking' share "
                   f"{shares[0]} -> {shares[1]} (0: muted); updates: B's subscription {sub.get('status')}, got {sub.get('generating')} "
                   f"(showing {list(sub.get('saw_of_a') or {}) or 'nothing'}), A got "
                   f"{dig(result, 'foreign_call', 'a_updates_3s_before')} in 3 s before, "
                   f"{dig(result, 'foreign_call', 'a_updates_6s_after')} in 6 s after; stop: HTTP "
                   f"{b.get('quit_output_stream', {}).get('status')}, A got "
                   f"{dig(result, 'foreign_call', 'a_updates_after_quit')} updates in the "
                   f"{dig(result, 'foreign_call', 'quit_to_end_s')} s after")
    else:
        foreign = str(b)
    ghosts = result["checks"].get("ghost_subscriptions")
    no_event = isinstance(ghosts, dict) and "state_change_dependency" in ghosts and ghosts["state_change_dependency"] is None
    rows = [
        ("page load with 40 ghost subscriptions open (s)",
         "no page-update event to subscribe to" if no_event else dig(result, "ghost_subscriptions", "page_load_s")),
        ("ghost subscriptions that ended at once", "n/a" if no_event else dig(result, "ghost_subscriptions", "ended_at_once")),
        ("real 6 s call with the 40 ghosts open",
         "n/a" if no_event else call_text(dig(result, "ghost_subscriptions", "call"))),
        ("page load 3 s after closing the 40 ghosts (s)",
         "n/a" if no_event else dig(result, "ghost_subscriptions", "page_load_after_closing_s")),
        ("real call admitted after 8 ghost offers (s; tries)",
         f"{dig(result, 'ghost_offers', 'real_call_admitted_after_s')}; {dig(result, 'ghost_offers', 'tries')}"),
        ("RSS growth a minute after 40 x 10 MB strings (MB)", dig(result, "big_strings", "rss_growth_mb_60s_later")),
        ("KB per page tick / per new session",
         f"{dig(result, 'page_ticks', 'kb_per_tick')} / {dig(result, 'page_ticks', 'kb_per_new_session')}"),
        ("uploads of 99 MB accepted, disk used", uploads_text),
        ("live call during 4 offline runs", call_text(live)),
        ("file modes under GRADIO_TEMP_DIR", modes_text(dig(result, "file_modes", "gradio_temp_modes"))),
        ("file modes in the app's store", modes_text(dig(result, "file_modes", "app_store_modes"))),
        ("foreign page: mute / take updates / stop", foreign),
        ("bad-value requests with error null / total",
         f"{dig(result, 'bad_values', 'outcomes', 'error_null') or 0} / {dig(result, 'bad_values', 'requests')}"),
    ]
    lines = ["| figure | value |", "|---|---|", *(f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated, of: {', '.join(CHECKS)}")
    p.add_argument("--ticks", type=int, default=900, help="status ticks of one page (900: half an hour at 2 s)")
    p.add_argument("--port", type=int, default=0, help="the app's port (default: a free one)")
    p.add_argument("--log-dir", type=Path, help="where the app's logs are kept (default: a new temporary folder)")
    p.add_argument("--json", type=Path, help="write the figures here (after every check)")
    args = p.parse_args(argv)
    args.checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = [c for c in args.checks if c not in CHECKS]
    if unknown:
        p.error(f"unknown checks: {', '.join(unknown)}")
    args.checks = [c for c in CHECKS if c in args.checks]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("aioice").setLevel(logging.WARNING)
    result = run(args)
    sys.stdout.write(summary(result))


if __name__ == "__main__":
    main()
