"""What the engine's schedule adds to a live call's latency, and whether other users' work stalls it.

    python -m benchmarks.latency --json latency.json

The service runs the tiny checkpoint on the CPU, as the app does. Four real-time clients push
20 ms chunks (one Opus packet, as the app's handler passes them on; `--chunk-ms 40` for what
fastrtc handed over at 24 kHz) at phases 0, 20, 40 and 60 ms of the 80 ms frame (`--phases-ms`), and a consumer per session takes every output frame the moment it is
ready; each call begins 0.3 s after its audio starts (the page sends the settings meanwhile).
The latency of frame k is the time from the push of the chunk that completed it to the moment
the session hands out the model's answer to it: the wait for the tick plus the tick's compute
(reported too). Two stretches are measured: "quiet" (only the four calls) and "load" (at its
start 8 more sessions join at once and a 30 s custom voice is encoded). The engine thread's
tick starts give the intervals between ticks. Figures live in BENCHMARKS.md. With `--rows PATH`
each figure is also appended there as a JSON line the moment it is known: the service's start
first, then each join and the voice's encoding as they finish, then each stretch.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from personaplex.model.config import FRAME_SIZE, SAMPLE_RATE, SamplingParams
from personaplex.runtime.audio import read_audio, write_wav
from personaplex.runtime.session import Session
from personaplex.serve.contract import CallSettings
from personaplex.serve.service import Service, Settings

from .rows import Rows

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny" / "checkpoint"
ROLE = "You enjoy having a good conversation."
CONNECT_S = 0.3  # audio before the call's settings arrive and its prompt is queued


@dataclass
class Client:
    """One real-time caller: pushes chunks on its own clock, takes the answers as they come."""

    session: Session
    phase_s: float
    chunk: int  # samples at 24 kHz a push
    pushed_at: list[float] = field(default_factory=list)  # per chunk
    answered_at: dict[int, float] = field(default_factory=dict)  # per output frame index

    def run(self, speech: np.ndarray, start: float, stop: float, begin: Callable[[Session], None]) -> None:
        """Push from `start` to `stop`; the call begins (`begin`) after `CONNECT_S` of audio,
        as in the app, where audio flows while the page sends the call's settings."""
        reader = threading.Thread(target=self._consume, daemon=True)
        reader.start()
        starter = threading.Timer(max(0.0, start + CONNECT_S - time.monotonic()), begin, args=(self.session,))
        starter.start()
        i, chunk_s = 0, self.chunk / SAMPLE_RATE
        while True:
            due = start + self.phase_s + i * chunk_s
            if due >= stop:
                break
            time.sleep(max(0.0, due - time.monotonic()))
            offset = (i * self.chunk) % (speech.size - self.chunk)
            self.session.push(speech[offset : offset + self.chunk])
            self.pushed_at.append(time.monotonic())
            i += 1
        self.session.end("stopped", "done")
        reader.join(5)

    def _consume(self) -> None:
        while True:
            out = self.session.next(0.5)
            if out is None:
                if self.session.ending is not None:
                    return
                continue
            self.answered_at[out.index] = time.monotonic()

    def latencies_ms(self, since: float, until: float) -> list[float]:
        """Push of the completing chunk -> answer, for the frames completed in [since, until)."""
        shift = getattr(self.session, "framing_shift", 0) or 0  # zeros the session put in front of its frames (none: not aligned)
        out = []
        for k, answered in self.answered_at.items():
            end = (k + 1) * FRAME_SIZE - shift  # the frame's last input sample (raw stream)
            j = (end - 1) // self.chunk
            if 0 <= j < len(self.pushed_at) and since <= self.pushed_at[j] < until:
                out.append((answered - self.pushed_at[j]) * 1000)
        return out


def summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    q = np.percentile(values, [50, 99])
    return {"n": len(values), "p50_ms": round(float(q[0]), 1), "p99_ms": round(float(q[1]), 1), "max_ms": round(max(values), 1)}


def long_voice(folder: Path, seconds: float) -> Path:
    pcm = read_audio(ROOT / "examples" / "voice_sample.wav")
    path = folder / "long_voice.wav"
    write_wav(path, np.tile(pcm, int(seconds * SAMPLE_RATE / pcm.size) + 1)[: int(seconds * SAMPLE_RATE)])
    return path


def run(args: argparse.Namespace, rows_out: Rows | None = None) -> dict:
    out = rows_out or Rows(None)
    lock = threading.Lock()  # the joiners and the voice's encoding write rows from their own threads

    def emit(row: str, **figures: object) -> None:
        with lock:
            out.emit(row, **figures)

    torch.manual_seed(0)
    service = Service(Settings(checkpoint=str(TINY), config=str(TINY / "tiny_config.json"), device="cpu",
                               max_sessions=args.slots))
    started = time.perf_counter()
    service.start()
    assert service.wait_ready(120).ready, service.status.message
    worker = service.worker
    assert worker is not None
    machine = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
               "torch_threads": torch.get_num_threads()}
    emit("service", checkpoint="tiny", device="cpu", slots=args.slots, chunk_ms=args.chunk_ms, phases_ms=args.phases_ms,
         joiners=args.joiners, start_s=round(time.perf_counter() - started, 1), status=service.status.message,
         warm_up_tick_ms=service.status.frame_ms, **machine)
    ticks: list[float] = []
    compute: list[tuple[float, float]] = []
    original = worker._tick

    def timed(live):  # the engine thread's tick, with its start and its compute time recorded
        ticks.append(time.monotonic())
        original(live)
        compute.append((ticks[-1], worker.last_tick_ms))

    worker._tick = timed  # type: ignore[method-assign]
    speech = read_audio(ROOT / "examples" / "user_question.wav")
    sampling = SamplingParams(seed=1)
    folder = Path(tempfile.mkdtemp())
    voice_path = long_voice(folder, args.voice_seconds)

    def begin(session: Session) -> None:
        service.start_call(session, CallSettings("TESTV0", ROLE, sampling))

    start = time.monotonic() + 0.5
    quiet_from, load_at = start + args.settle, start + args.settle + args.quiet
    stop = load_at + args.load
    chunk = round(args.chunk_ms * SAMPLE_RATE / 1000)
    clients = [Client(Session(), float(p) / 1000, chunk) for p in args.phases_ms.split(",")]
    threads = [threading.Thread(target=c.run, args=(speech, start, stop, begin)) for c in clients]
    joiners: list[Client] = []
    join_ms: list[float] = []
    voice_ms: list[float] = []

    def join_one(k: int) -> None:
        client = Client(Session(), (k * 0.011) % 0.08, chunk)
        joiners.append(client)

        def timed_begin(session: Session) -> None:
            begun = time.monotonic()
            begin(session)
            while session.phase.value == "starting":
                time.sleep(0.002)
            join_ms.append((time.monotonic() - begun) * 1000)  # until its prompt has run
            emit("join", phase_ms=round(client.phase_s * 1000), to_live_ms=round(join_ms[-1], 1))

        client.run(speech, time.monotonic(), stop, timed_begin)

    def encode_voice() -> None:
        begun = time.monotonic()
        service.add_custom_voice(voice_path, "latency")
        voice_ms.append((time.monotonic() - begun) * 1000)
        emit("voice_encode", seconds=args.voice_seconds, ms=round(voice_ms[0], 1))

    def load() -> None:
        time.sleep(max(0.0, load_at - time.monotonic()))
        extra = [threading.Thread(target=join_one, args=(k,)) for k in range(args.joiners)]
        extra.append(threading.Thread(target=encode_voice))
        for t in extra:
            t.start()
        for t in extra:
            t.join()

    threads.append(threading.Thread(target=load))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    worker.stop()

    def intervals(since: float, until: float) -> list[float]:
        inside = [t for t in ticks if since <= t < until]
        return [(b - a) * 1000 for a, b in itertools.pairwise(inside)]

    stretches = {"quiet": (quiet_from, load_at), "load": (load_at, stop)}
    result = {
        "machine": machine,
        "slots": args.slots, "chunk_ms": args.chunk_ms,
        "tick_ms_last": round(worker.last_tick_ms, 1),
        "join_to_live_ms": summary(join_ms), "voice_encode_ms": round(voice_ms[0], 1) if voice_ms else None,
    }
    for name, (since, until) in stretches.items():
        gaps = intervals(since, until)
        result[name] = {
            "tick_interval": summary(gaps),
            "tick_compute": summary([ms for t, ms in compute if since <= t < until]),
            "clients": [{"phase_ms": round(c.phase_s * 1000), "framing_shift": getattr(c.session, "framing_shift", None),
                         **summary(c.latencies_ms(since, until)),
                         "unheard": c.session.stats.unheard, "silent_out": c.session.stats.silent_out} for c in clients],
        }
        emit("stretch", stretch=name, **result[name])
    emit("after_calls", tick_ms_last=result["tick_ms_last"], join_to_live_ms=result["join_to_live_ms"],
         voice_encode_ms=result["voice_encode_ms"])
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--chunk-ms", type=float, default=20.0, help="audio per push (the app: 20; before it: 40)")
    p.add_argument("--phases-ms", default="0,20,40,60", help="when each client's chunks start, in the 80 ms frame")
    p.add_argument("--settle", type=float, default=3.0, help="seconds before the quiet stretch is measured")
    p.add_argument("--quiet", type=float, default=10.0, help="seconds of the quiet stretch")
    p.add_argument("--load", type=float, default=10.0, help="seconds of the stretch with joins and a voice upload")
    p.add_argument("--joiners", type=int, default=8)
    p.add_argument("--voice-seconds", type=float, default=29.5)
    p.add_argument("--json", help="also write the result to this file")
    p.add_argument("--rows", help="append each figure to this file as a JSON line the moment it is measured")
    args = p.parse_args(argv)
    with Rows(args.rows) as rows:
        result = run(args, rows)
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
