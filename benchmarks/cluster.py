"""The cluster's hop: what Ray Serve's proxy adds to each 80 ms frame of a call, and how fast a
full cluster says no.

    python -m benchmarks.cluster [--calls 5] [--seconds 10] [--json out.jsonl]

Implements:
  * `Server`: a server in a subprocess on a free port, its log in a temp file, waited for until
    ready and always stopped (SIGTERM, then a kill after 60 s). Two run side by side on this
    machine: the cluster (`python -m personaplex.cluster`, 2 replicas x 2 slots of the tiny
    checkpoint on the CPU; ready when `/api/status` says so) and the single-process app
    (`python app.py`, the tiny checkpoint, 4 slots; ready when its log says so).
  * `timed_call`: one call over the Moshi/PersonaPlex protocol (`/api/chat`): after the
    handshake, one 1920-sample frame of low noise (Opus must encode something) every 80 ms in
    real time; for each frame k, the time it was sent and the time the k-th 80 ms of the
    answer's audio was complete (decoded samples counted: 1920 * (k + 1)). The server answers
    every frame in with exactly one frame out, in order, so recv_k - send_k is the frame's round
    trip: the transport both ways, Opus both ways, and the engine's tick.
  * `round_trip_row`, `hop_row`: p50/p90/p99 of the round trips of every call to a target (the
    first `WARMUP_FRAMES` of each call left out: the session's start), the time from connecting
    to the handshake (admission), and the hop's cost: the cluster's figures minus the app's.
  * `refusal_row`: with every slot of the cluster taken by 4 live calls (`held_call`), the time
    from connecting a 5th to its refusal (the kind-5 message), and that message.

Every row is one JSON object, written to stdout (and appended to `--json`) as soon as it is
measured, so a killed run keeps what it had. The calls to a target run one after another; the
other server idles meanwhile on the same cores (its share of them is part of both figures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import sphn
import websockets

logger = logging.getLogger("benchmarks.cluster")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny" / "checkpoint"
MODEL_ARGS = ["--checkpoint", str(TINY), "--config", str(TINY / "tiny_config.json"), "--device", "cpu"]
CLUSTER_ARGS = ["-m", "personaplex.cluster", "--replicas", "2", "--max-sessions", "2", "--cpus-per-replica", "0.5"]
APP_ARGS = [str(ROOT / "app.py"), "--max-sessions", "4"]
QUERY = "voice_prompt=TESTV0.pt"
SLOTS = 4  # of each target: 2 replicas x 2, and the app's 4

RATE = 24_000
FRAME = 1920  # 80 ms at 24 kHz: one frame in, one frame out
FRAME_S = FRAME / RATE
NOISE = 0.01  # the microphone's amplitude: quiet, but not silence
HANDSHAKE, AUDIO, TEXT, ERROR = 0, 1, 2, 5
WARMUP_FRAMES = 5  # of each call, left out of the round trips
READY_TIMEOUT_S = 300.0
HANDSHAKE_TIMEOUT_S = 150.0  # the server's own limit for the persona's prompt is 120 s
TAIL_TIMEOUT_S = 5.0  # after the last frame sent, the wait for the last frames back
STOP_TIMEOUT_S = 60.0
REFUSALS = 3


# --- the servers --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_log() -> Path:
    fd, name = tempfile.mkstemp(prefix="bench-cluster-", suffix=".log")
    os.close(fd)
    return Path(name)


@dataclass
class Server:
    """One server (`args` after the Python executable) in a subprocess, its output in a log file;
    ready when its `/api/status` says so (`by_status`), else when its log says so (the app)."""

    name: str
    args: list[str]
    by_status: bool
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    log: Path = field(default_factory=new_log)

    @property
    def chat_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/chat?{QUERY}"

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
        command = [sys.executable, *self.args, *MODEL_ARGS, "--port", str(self.port)]
        with self.log.open("w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        logger.info("%s: started (pid %s, log %s)", self.name, self.process.pid, self.log)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def ready(self) -> bool:
        """The app: its log says the page is up and the model ready; the cluster: its status says ready."""
        if not self.by_status:
            text = self.output()
            if "failed:" in text:
                raise RuntimeError(f"{self.name} failed to start:\n{text[-3000:]}")
            return "the page is up" in text and "ready: ready" in text
        try:
            return bool(httpx.get(f"http://127.0.0.1:{self.port}/api/status", timeout=2).json().get("ready"))
        except (httpx.HTTPError, ValueError):
            return False

    def stop(self) -> None:
        """SIGTERM, and the wait for it to end (the cluster shuts Ray down); a kill after 60 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning("%s: still running %g s after SIGTERM: killed", self.name, STOP_TIMEOUT_S)
            self.process.kill()
            self.process.wait()
        logger.info("%s: stopped (exit status %s)", self.name, self.process.returncode)


def wait_ready(servers: list[Server], emit: Callable[[dict], None]) -> None:
    """Until every server is ready (a `startup` row each, with its seconds from the start)."""
    began = time.monotonic()
    waiting = list(servers)
    while waiting and time.monotonic() - began < READY_TIMEOUT_S:
        for server in list(waiting):
            assert server.process is not None
            if server.process.poll() is not None:
                raise RuntimeError(f"{server.name} exited ({server.process.returncode}):\n{server.output()[-3000:]}")
            if server.ready():
                waiting.remove(server)
                emit({"row": "startup", "target": server.name, "ready_s": round(time.monotonic() - began, 1),
                      "log": str(server.log)})
        time.sleep(0.5)
    if waiting:
        raise RuntimeError(f"{waiting[0].name} not ready in {READY_TIMEOUT_S:g} s:\n{waiting[0].output()[-3000:]}")


# --- one timed call -----------------------------------------------------------------------------
@dataclass
class CallTiming:
    """One call's admission (connect to handshake) and, per frame, when it was sent and answered."""

    admission_s: float = 0.0
    sends: list[float] = field(default_factory=list)
    recvs: list[float] = field(default_factory=list)
    ended: str | None = None  # the server's kind-5 message or the close, if it ended the call first

    def round_trips_ms(self) -> list[float]:
        """recv_k - send_k of every frame answered, the first `WARMUP_FRAMES` left out."""
        answered = min(len(self.sends), len(self.recvs))
        return [1000 * (self.recvs[k] - self.sends[k]) for k in range(WARMUP_FRAMES, answered)]


async def handshake(ws: Any) -> tuple[int, str]:
    """The server's first message: its kind, and its text if a refusal."""
    first = await asyncio.wait_for(ws.recv(), HANDSHAKE_TIMEOUT_S)
    return first[0], bytes(first[1:]).decode(errors="replace") if first[0] == ERROR else ""


def noise(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(-NOISE, NOISE, FRAME).astype(np.float32)


async def send_frames(ws: Any, frames: int, sends: list[float], answering: asyncio.Task | None = None) -> None:
    """The microphone: `frames` frames of noise, one every 80 ms on a fixed clock, each page sent
    as one message and its send time kept; stops early if the server ends the call."""
    writer, rng = sphn.OpusStreamWriter(RATE), np.random.default_rng(len(sends))
    began = time.monotonic()
    for k in range(frames):
        if answering is not None and answering.done():
            return
        page = bytes(writer.append_pcm(noise(rng)))
        if not page:
            raise RuntimeError("sphn kept a whole frame back: its send time would be wrong")
        sends.append(time.monotonic())
        try:
            await ws.send(bytes([AUDIO]) + page)
        except websockets.ConnectionClosed:
            return
        await asyncio.sleep(max(0.0, began + (k + 1) * FRAME_S - time.monotonic()))


async def receive_frames(ws: Any, frames: int, recvs: list[float]) -> str | None:
    """The answer: the arrival time of each complete 80 ms of decoded audio, until `frames` of
    them (None) or the server ends the call (its message, or how it closed)."""
    reader, samples = sphn.OpusStreamReader(RATE), 0
    try:
        async for message in ws:
            now = time.monotonic()
            if message[0] == ERROR:
                return bytes(message[1:]).decode(errors="replace")
            if message[0] != AUDIO:
                continue  # text pieces: the audio of the same frame follows
            samples += np.asarray(reader.append_bytes(bytes(message[1:]))).size
            recvs.extend([now] * (samples // FRAME - len(recvs)))
            if len(recvs) >= frames:
                return None
    except websockets.ConnectionClosed as closed:
        return f"closed: {closed}"
    return "closed by the server"


async def timed_call(url: str, seconds: float) -> CallTiming:
    """One call of `seconds`: admission, then every frame's send and answer times."""
    frames, timing = round(seconds / FRAME_S), CallTiming()
    began = time.monotonic()
    async with websockets.connect(url, max_size=None) as ws:
        kind, message = await handshake(ws)
        if kind != HANDSHAKE:
            raise RuntimeError(f"{url}: no handshake but kind {kind}: {message}")
        timing.admission_s = time.monotonic() - began
        answering = asyncio.create_task(receive_frames(ws, frames, timing.recvs))
        await send_frames(ws, frames, timing.sends, answering)
        try:
            timing.ended = await asyncio.wait_for(answering, TAIL_TIMEOUT_S)
        except TimeoutError:
            timing.ended = f"{frames - len(timing.recvs)} frame(s) not answered {TAIL_TIMEOUT_S:g} s after the last"
    return timing


# --- the rows -----------------------------------------------------------------------------------
def ms(value: float) -> float:
    return round(float(value), 1)


def call_row(target: str, index: int, timing: CallTiming) -> dict:
    """One call's figures, as soon as it ends (the aggregate rows pool every frame)."""
    trips = timing.round_trips_ms()
    return {"row": "call", "target": target, "call": index, "admission_ms": ms(1000 * timing.admission_s),
            "p50_ms": ms(np.percentile(trips, 50)) if trips else None, "max_ms": ms(max(trips)) if trips else None,
            "frames_sent": len(timing.sends), "frames_answered": len(timing.recvs), "ended": timing.ended}


def round_trip_row(target: str, timings: list[CallTiming]) -> dict:
    """p50/p90/p99 of every frame's round trip over every call to `target`."""
    trips = [t for timing in timings for t in timing.round_trips_ms()]
    p50, p90, p99 = (ms(p) for p in np.percentile(trips, [50, 90, 99])) if trips else (None, None, None)
    return {"row": "round_trip", "target": target, "p50_ms": p50, "p90_ms": p90, "p99_ms": p99,
            "frames": len(trips), "calls": len(timings)}


def admission_row(target: str, timings: list[CallTiming]) -> dict:
    """From connecting to the handshake (the persona's prompt run in the slot), per call."""
    took = [1000 * timing.admission_s for timing in timings]
    return {"row": "admission", "target": target, "median_ms": ms(statistics.median(took)), "max_ms": ms(max(took)),
            "calls": len(timings)}


def hop_row(app: dict, cluster: dict) -> dict:
    """What going through Serve's proxy to a replica adds to a frame's round trip."""
    def difference(key: str) -> float | None:
        return None if app[key] is None or cluster[key] is None else ms(cluster[key] - app[key])

    return {"row": "hop", "p50_ms": difference("p50_ms"), "p99_ms": difference("p99_ms")}


async def measure_target(target: str, url: str, calls: int, seconds: float, emit: Callable[[dict], None]) -> dict:
    """`calls` calls one after another; their rows, and the pooled round-trip row (returned)."""
    timings = []
    for index in range(calls):
        logger.info("%s: call %d of %d (%g s)", target, index + 1, calls, seconds)
        timings.append(await timed_call(url, seconds))
        emit(call_row(target, index, timings[-1]))
    emit(admission_row(target, timings))
    row = round_trip_row(target, timings)
    emit(row)
    return row


# --- a full cluster's refusal -------------------------------------------------------------------
async def drain(ws: Any) -> None:
    """Reads and drops what the server sends (a held call's answer must not back up)."""
    try:
        async for _ in ws:
            pass
    except websockets.ConnectionClosed:
        pass


async def held_call(url: str, live: asyncio.Event, stop: asyncio.Event) -> None:
    """A call that takes a slot: handshake (then `live`), noise every 80 ms until `stop`."""
    async with websockets.connect(url, max_size=None) as ws:
        kind, message = await handshake(ws)
        if kind != HANDSHAKE:
            raise RuntimeError(f"a held call was refused: {message}")
        live.set()
        answering = asyncio.create_task(drain(ws))
        sending = asyncio.create_task(send_frames(ws, 10**9, [], answering))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([answering, sending, stopped], return_when=asyncio.FIRST_COMPLETED)
        for task in (answering, sending, stopped):
            task.cancel()
        await asyncio.gather(answering, sending, stopped, return_exceptions=True)
        if not stop.is_set():
            raise RuntimeError("the server ended a held call")


async def refused_call(url: str) -> tuple[float, int, str]:
    """Connect to the refusal (or to whatever else comes first): seconds, kind, message."""
    began = time.monotonic()
    async with websockets.connect(url, max_size=None) as ws:
        kind, message = await handshake(ws)
        return time.monotonic() - began, kind, message


async def hold(url: str, stop: asyncio.Event) -> asyncio.Task:
    """One more held call, once it is live (its handshake came)."""
    live = asyncio.Event()
    task = asyncio.create_task(held_call(url, live, stop))
    waiting = asyncio.create_task(live.wait())
    await asyncio.wait([task, waiting], timeout=HANDSHAKE_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if not live.is_set():
        task.cancel()
        raise RuntimeError(f"a call to hold a slot did not get in: {task.exception() if task.done() else 'timed out'}")
    return task


async def refusal_row(url: str, emit: Callable[[dict], None]) -> None:
    """Every slot taken by a live call (opened one after another); then `REFUSALS` times, a call
    more, timed from connecting to its kind-5 message."""
    stop = asyncio.Event()
    held: list[asyncio.Task] = []
    try:
        for _ in range(SLOTS):
            held.append(await hold(url, stop))
        tries = []
        for _ in range(REFUSALS):
            tries.append(await refused_call(url))
            await asyncio.sleep(0.5)  # the refused connection's count cleared at the router
        took = [1000 * s for s, _, _ in tries]
        emit({"row": "refusal", "target": "cluster", "held": SLOTS, "median_ms": ms(statistics.median(took)),
              "max_ms": ms(max(took)), "tries_ms": [ms(t) for t in took], "refused": sum(k == ERROR for _, k, _ in tries),
              "message": tries[-1][2], "held_alive": sum(not task.done() for task in held)})
    finally:
        stop.set()
        await asyncio.gather(*held, return_exceptions=True)


# --- the run ------------------------------------------------------------------------------------
def emitter(path: Path | None) -> Callable[[dict], None]:
    """Writes a row as one JSON line to stdout (and appends it to `path`), flushed at once."""

    def emit(row: dict) -> None:
        line = json.dumps(row) + "\n"
        sys.stdout.write(line)
        sys.stdout.flush()
        if path is not None:
            with path.open("a") as out:
                out.write(line)

    return emit


def machine_row() -> dict:
    import ray
    import torch

    return {"row": "machine", "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray.__version__, "websockets": websockets.__version__, "platform": platform.platform()}


async def measure(app: Server, cluster: Server, args: argparse.Namespace, emit: Callable[[dict], None]) -> None:
    rows = {}
    for server in (app, cluster):
        rows[server.name] = await measure_target(server.name, server.chat_url, args.calls, args.seconds, emit)
    emit(hop_row(rows["app"], rows["cluster"]))
    logger.info("cluster: %d calls held, %d refused", SLOTS, REFUSALS)
    await refusal_row(cluster.chat_url, emit)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5, help="sequential calls to each target")
    parser.add_argument("--seconds", type=float, default=10.0, help="of each call")
    parser.add_argument("--json", type=Path, help="also append every row (a JSON line) to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not every status poll
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the servers are stopped
    emit = emitter(args.json)
    emit(machine_row())
    cluster, app = Server("cluster", CLUSTER_ARGS, by_status=True), Server("app", APP_ARGS, by_status=False)
    try:
        cluster.start()
        app.start()
        wait_ready([cluster, app], emit)
        asyncio.run(measure(app, cluster, args, emit))
    finally:
        for server in (app, cluster):
            server.stop()


if __name__ == "__main__":
    main()
