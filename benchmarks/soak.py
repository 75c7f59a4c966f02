"""Long calls: the app as the README starts it, N real-time WebRTC calls held for minutes, the
server's memory and the calls' health sampled every 10 s, before and after the model's window fills.

    python -m benchmarks.soak --calls 4 --minutes 10 --json soak.json

The server runs the tiny checkpoint on the CPU unless `--app-args` says otherwise; the calls are
the aiortc client of examples/ (the browser's signalling), each sending a real recording in a
loop. Memory is the server process's resident set (VmRSS), read from /proc: at start, after a
short warm-up call (the first call loads Opus, aiortc and torch's caches), every 10 s, and
10 s after the last call ended. Every 10 s each call also reports the audio it has
received, the engine tick and what the model's window holds (the page's figures); the summary
("window") compares the stretch before every call's window was full with the stretch after
(the app keeps the persona by default: the prompt stays, the oldest conversation slides out),
so that growth, errors or a slow-down at the wrap show up. With `--rows PATH` each figure is
also appended there as a JSON line the moment it is taken: the app's start first, then the
warm-up, every 10 s sample, each call as it ends, and the figures after the calls.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np

from .rows import Rows

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny" / "checkpoint"
DEFAULT_APP_ARGS = f"--checkpoint {TINY} --config {TINY / 'tiny_config.json'} --device cpu"
SAMPLE_EVERY_S = 10.0


def load_client() -> ModuleType:
    spec = importlib.util.spec_from_file_location("webrtc_client", ROOT / "examples" / "webrtc_client.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class App:
    """`python app.py` in a subprocess, until it says it is ready."""

    def __init__(self, port: int, extra: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = Path(tempfile.mkstemp(suffix=".log")[1])
        args = [sys.executable, str(ROOT / "app.py"), "--port", str(port), *extra.split()]
        self.process = subprocess.Popen(args, stdout=self.log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text()
            if "ready: ready" in text and "the page is up" in text:
                return
            if self.process.poll() is not None or "failed:" in text:
                break
            time.sleep(0.5)
        raise RuntimeError(f"the app did not start:\n{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def health_figure(details: str, label: str) -> str:
    """The text of one row of the page's call details table."""
    marker = f"<td>{label}</td><td>"
    start = details.find(marker)
    return details[start + len(marker) : details.find("</td>", start + len(marker))] if start >= 0 else ""


def tick_ms(details: str) -> float | None:
    """The engine tick of the call's figures ("17.2 ms for an 80 ms frame ..."), if shown yet."""
    text = health_figure(details, "engine tick")
    return float(text.split(" ms")[0]) if text else None


async def soak(app: App, client: ModuleType, speech: np.ndarray, calls: int, seconds: float, out: Rows) -> dict:
    samples: list[dict] = []
    started = time.monotonic()
    watched = [client.CallResult(audio=np.zeros(0, dtype=np.float32)) for _ in range(calls)]

    async def sample() -> None:
        while True:
            samples.append({"t_s": round(time.monotonic() - started, 1), "rss_mb": round(rss_mb(app.process.pid), 1),
                            "received_s": [round(r.received_samples / client.RATE, 1) for r in watched],
                            "tick_ms": [tick_ms(r.details) for r in watched],
                            "memory": [health_figure(r.details, "the model's memory") for r in watched]})
            out.emit("sample", **samples[-1])
            await asyncio.sleep(SAMPLE_EVERY_S)

    sampler = asyncio.ensure_future(sample())
    looped = np.tile(speech, int(seconds * client.RATE / speech.size) + 2)

    async def call(k: int, watch) -> dict:
        r = await client.converse(app.url, looped, seconds, {"voice": "TESTV0"}, result=watch)
        figures = {"received_s": round(r.audio.size / client.RATE, 1), "ended_by_app": r.ended,
                   "tick": health_figure(r.details, "engine tick"), "user_dropped": health_figure(r.details, "your audio dropped"),
                   "model_dropped": health_figure(r.details, "the model's audio dropped"),
                   "call_time": health_figure(r.details, "call time"), "turns": len(r.conversation),
                   "page_updates": r.output_updates, "update_errors": r.output_errors[:3]}
        out.emit("call", call=k, **figures)
        return figures

    results = await asyncio.gather(*(call(k, r) for k, r in enumerate(watched)))
    sampler.cancel()
    return {"samples": samples, "calls": list(results)}


def before_and_after_the_window_fills(samples: list[dict]) -> dict:
    """Tick, audio received per second of call, and memory, while every call's window still
    had room and once every call's was full (the persona pinned, the conversation sliding)."""
    parts: dict[str, list[dict]] = {"before": [], "after": []}
    for prev, cur in itertools.pairwise(samples):
        full = [m.startswith("full") for m in cur["memory"]]
        part = "after" if all(full) else "before" if not any(full) else None
        if part is None or not all(cur["memory"]):
            continue
        dt = cur["t_s"] - prev["t_s"]
        rates = [(b - a) / dt for a, b in zip(prev["received_s"], cur["received_s"])]
        parts[part].append({"t_s": cur["t_s"], "rss_mb": cur["rss_mb"], "rates": rates,
                            "ticks": [t for t in cur["tick_ms"] if t is not None]})
    summary = {}
    for part, rows in parts.items():
        if rows:
            summary[part] = {
                "from_s": rows[0]["t_s"], "to_s": rows[-1]["t_s"],
                "tick_ms_median": statistics.median(t for r in rows for t in r["ticks"]),
                "tick_ms_max": max(t for r in rows for t in r["ticks"]),
                "audio_s_per_s_min": round(min(x for r in rows for x in r["rates"]), 3),
                "audio_s_per_s_median": round(statistics.median(x for r in rows for x in r["rates"]), 3),
                "rss_mb_first": rows[0]["rss_mb"], "rss_mb_last": rows[-1]["rss_mb"],
            }
    return summary


def run(args: argparse.Namespace, rows_out: Rows | None = None) -> dict:
    out = rows_out or Rows(None)
    client = load_client()
    speech = client.load_48k(str(args.speech))
    started = time.perf_counter()
    app = App(args.port, f"{args.app_args} --max-sessions {args.calls} --time-limit 0")
    try:
        app.wait_ready()
        at_start = rss_mb(app.process.pid)
        out.emit("app", calls=args.calls, minutes=args.minutes, app_args=args.app_args,
                 start_s=round(time.perf_counter() - started, 1), rss_mb=round(at_start, 1))
        asyncio.run(client.converse(app.url, speech, 5.0, {"voice": "TESTV0"}))  # warm-up call
        time.sleep(2)
        after_warmup = rss_mb(app.process.pid)
        out.emit("warmup", rss_mb=round(after_warmup, 1))
        result = asyncio.run(soak(app, client, speech, args.calls, args.minutes * 60, out))
        time.sleep(10)
        at_end = rss_mb(app.process.pid)
        errors = [line for line in app.log.read_text().splitlines() if "Traceback" in line or " ERROR " in line]
    finally:
        app.stop()
    rss = [s["rss_mb"] for s in result["samples"]]
    figures = {
        "rss_mb": {"at_start": round(at_start, 1), "after_warmup": round(after_warmup, 1), "during_max": max(rss),
                   "during_median": statistics.median(rss), "after_calls": round(at_end, 1),
                   "growth_since_warmup": round(at_end - after_warmup, 1)},
        "server_errors": len(errors), "window": before_and_after_the_window_fills(result["samples"]),
    }
    out.emit("after_calls", **figures)
    return {"calls": args.calls, "minutes": args.minutes, "app_args": args.app_args, **figures, **result}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=4)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--port", type=int, default=7870)
    p.add_argument("--app-args", default=DEFAULT_APP_ARGS, help="how to start app.py (default: the tiny checkpoint on the CPU)")
    p.add_argument("--speech", type=Path, default=ROOT / "examples" / "user_question.wav", help="what every caller says, in a loop")
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument("--rows", help="append each figure to this file as a JSON line the moment it is measured")
    args = p.parse_args(argv)
    with Rows(args.rows) as rows:
        result = run(args, rows)
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text)
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
