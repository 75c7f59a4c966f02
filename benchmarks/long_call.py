"""A long call for whoever has the real weights: one scripted conversation past the model's
4-minute context, with and without the pinned persona, audio and words side by side.

    python -m benchmarks.long_call --out long_call/                 # the 7B release (hub), on a GPU
    python -m benchmarks.long_call --checkpoint DIR --out long_call/ --device cpu

The user's side is examples/long_call/script.json: short turns recorded once with espeak-ng,
spaced by silence, over 8 minutes; the one at minute 6 asks for the persona's name and its
restaurant, facts that only the role prompt gives and that have left the model's window by
then unless the persona is pinned. Both runs share the seed (or are greedy), so they are the
same conversation until the prompt starts to slide out. `--out` receives:

    user.wav                  the user's side (mono, 24 kHz)
    sliding/agent.wav         the model, as the reference runs it (the prompt slides out)
    sliding/call.wav          stereo: the user left, the model right (to listen to)
    sliding/text.json         one label a frame, as the offline CLI writes it
    pinned/...                the same with the persona kept (`--keep-persona`)
    side_by_side.md           every user turn with what each run said until the next turn
    summary.json              lengths, when the prompt starts to slide out, ms per frame

With `--rows PATH` each figure is also appended there as a JSON line the moment it is measured:
the checkpoint, the device and the load time first, then each run as it ends, then where the
two runs part.

On the tiny test checkpoint the model babbles, but the machinery is the same (the tests run it
with a short context and a shortened script).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from personaplex.model.config import FRAME_RATE, FRAME_SIZE, PERSONAPLEX_7B, SAMPLE_RATE, SamplingParams, load_config
from personaplex.model.loading import load_models, resolve_checkpoint
from personaplex.model.text import Words
from personaplex.runtime.audio import read_audio, write_wav
from personaplex.runtime.engine import Engine
from personaplex.runtime.transcript import clock_text
from personaplex.serve.offline import Conversation, converse

from .rows import Rows

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "long_call" / "script.json"
PERSONAS = ROOT / "assets" / "personas.json"
RUNS = ("sliding", "pinned")  # without and with `keep_persona`

logger = logging.getLogger("benchmarks.long_call")


@dataclass
class Turn:
    at_s: float
    file: Path
    text: str


@dataclass
class Script:
    role: str
    voice: str
    minutes: float
    turns: list[Turn]


def load_script(path: Path = SCRIPT) -> Script:
    """The scripted call; its persona (role text and voice) comes from assets/personas.json."""
    raw = json.loads(path.read_text())
    personas = {p["name"]: p for p in json.loads(PERSONAS.read_text())["personas"]}
    persona = personas[raw["persona"]]
    turns = [Turn(float(t["at_s"]), path.parent / t["file"], t["text"]) for t in raw["turns"]]
    return Script(persona["prompt"], persona["voice"], float(raw["minutes"]), turns)


def user_track(turns: list[Turn], seconds: float) -> np.ndarray:
    """The user's side: each turn at its time, silence between, cut at `seconds`."""
    pcm = np.zeros(round(seconds * SAMPLE_RATE), dtype=np.float32)
    for turn in turns:
        start = round(turn.at_s * SAMPLE_RATE)
        if start < pcm.size:
            speech = read_audio(turn.file)[: pcm.size - start]
            pcm[start : start + speech.size] = speech
    return pcm


def first_difference(a, b) -> int:
    """The first index where two equally long sequences differ (their length if nowhere)."""
    differs = np.flatnonzero(np.asarray(a) != np.asarray(b))
    return int(differs[0]) if differs.size else len(a)


def words_between(text_ids: list[int], tokenizer, start_s: float, end_s: float) -> str:
    """What the model said in [start_s, end_s), as people read it."""
    frames = text_ids[int(start_s * FRAME_RATE) : int(end_s * FRAME_RATE)]
    words = Words(tokenizer)
    return "".join(words.caption(t) for t in frames).strip()


def side_by_side(turns: list[Turn], calls: dict[str, Conversation], tokenizer, seconds: float, slides_out_s: float) -> str:
    """A markdown table: each user turn (and the greeting before the first), with what each
    run said from then until the next turn."""
    starts = [0.0] + [t.at_s for t in turns if t.at_s < seconds]
    texts = ["(before the first turn)"] + [t.text for t in turns if t.at_s < seconds]
    lines = [f"The system prompt starts to slide out of the model's window at {clock_text(slides_out_s)} ({slides_out_s:.1f} s) "
             "in the sliding run; the pinned run keeps it.", "",
             "| at | the user says | " + " | ".join(f"the model ({name})" for name in calls) + " |",
             "|---|---|" + "---|" * len(calls)]
    for i, (start, text) in enumerate(zip(starts, texts)):
        end = starts[i + 1] if i + 1 < len(starts) else seconds
        said = [words_between(c.text_ids, tokenizer, start, end).replace("|", "\\|") or "…" for c in calls.values()]
        lines.append(f"| {clock_text(start)} | {text} | " + " | ".join(said) + " |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, rows_out: Rows | None = None) -> dict:
    out = rows_out or Rows(None)
    script = load_script(args.script)
    config = load_config(args.config) if args.config else PERSONAPLEX_7B
    dtype = getattr(torch, args.dtype) if args.dtype else None
    started = time.perf_counter()
    models = load_models(resolve_checkpoint(args.checkpoint, args.hf_repo), config, args.device, dtype)
    out.emit("models", checkpoint=args.checkpoint or args.hf_repo or "the release", config=args.config, device=args.device,
             dtype=str(next(models.lm.parameters()).dtype).removeprefix("torch."),
             load_s=round(time.perf_counter() - started, 1), torch=torch.__version__, cuda=torch.version.cuda)
    seconds = (args.minutes or script.minutes) * 60
    user = user_track(script.turns, seconds)
    sampling = SamplingParams(greedy=args.greedy, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_wav(args.out / "user.wav", user)
    calls: dict[str, Conversation] = {}
    summary: dict = {"seconds": seconds, "voice": args.voice or script.voice, "greedy": args.greedy, "seed": args.seed,
                     "device": args.device, "runs": {}}
    for name in RUNS:
        keep = name == "pinned"
        started = time.perf_counter()
        engine = Engine(models, num_slots=1, pinning=keep)
        engine_s = time.perf_counter() - started
        prompt = engine.prompt(engine.voice(args.voice or script.voice), script.role)
        started = time.perf_counter()
        calls[name] = call = converse(engine, user, prompt, sampling, keep_persona=keep)
        wall = time.perf_counter() - started
        summary["prompt_frames"] = prompt.num_frames
        summary["runs"][name] = {"frames": len(call.text_ids), "wall_s": round(wall, 1),
                                 "ms_per_frame": round(1000 * wall / max(1, len(call.text_ids)), 2)}
        out.emit("run", run=name, prompt_frames=prompt.num_frames, engine_start_s=round(engine_s, 1), **summary["runs"][name])
        folder = args.out / name
        folder.mkdir(exist_ok=True)
        write_wav(folder / "agent.wav", call.pcm)
        write_wav(folder / "call.wav", np.stack([user, call.pcm], axis=1))
        labels = [Words(models.tokenizer).label(t) for t in call.text_ids]
        (folder / "text.json").write_text(json.dumps(labels, ensure_ascii=False))
        logger.info("%s: %d frames in %.1f s", name, len(call.text_ids), wall)
    # A prompt of F frames runs F - 1 transformer steps; user frame i is step F - 1 + i, and
    # the plain ring drops the prompt's first step at step `context`.
    summary["prompt_slides_out_at_s"] = max(0, config.lm.context - summary["prompt_frames"] + 1) / FRAME_RATE
    sliding, pinned = (calls[name] for name in RUNS)
    summary["same_text_until_s"] = first_difference(sliding.text_ids, pinned.text_ids) / FRAME_RATE
    summary["same_audio_until_s"] = first_difference(sliding.pcm, pinned.pcm) // FRAME_SIZE / FRAME_RATE
    out.emit("parting", **{k: summary[k] for k in ("prompt_slides_out_at_s", "same_text_until_s", "same_audio_until_s")})
    table = side_by_side(script.turns, calls, models.tokenizer, seconds, summary["prompt_slides_out_at_s"])
    (args.out / "side_by_side.md").write_text(table)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="a local folder with the release file names")
    source.add_argument("--hf-repo", help="a hub repo with the release files (default: the release)")
    p.add_argument("--config", help="model hyper-parameters as JSON, in the reference's names (default: the 7B release)")
    p.add_argument("--script", type=Path, default=SCRIPT, help="the scripted call (default: examples/long_call/script.json)")
    p.add_argument("--voice", help="a voice of the checkpoint instead of the persona's")
    p.add_argument("--minutes", type=float, help="cut the call here (default: the script's length)")
    p.add_argument("--seed", type=int, default=42424242)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="LM weights (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--out", type=Path, required=True, help="folder for the audio, the text and the summary")
    p.add_argument("--rows", help="append each figure to this file as a JSON line the moment it is measured")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    with Rows(args.rows) as rows, torch.inference_mode():
        summary = run(args, rows)
    sys.stdout.write(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
