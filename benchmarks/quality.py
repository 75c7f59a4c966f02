"""Quality of the 8-bit formats: the same tokens through the model in a format and in plain bf16,
each against full precision.

    python -m benchmarks.quality --checkpoint DIR [--config JSON] --input-wav WAV --voice NAME \\
        --weights int8 --kv-cache fp8 [--device cpu|cuda] [--frames N] [--rows PATH]

The reference (float32 weights and cache on a CPU; on a GPU bf16 weights and cache) runs a call
over the input with a fixed seed, as an engine runs it: the system prompt, then one frame after
another, sampling. What its LM took at every live frame is recorded (the token column the
temporal transformer read, and the token each depformer step read), and the very same tokens
are fed (teacher forcing) to the reference again, to the model in the format asked (its
activations in bf16: w8a16) and to plain bf16, each after the same prompt in the same kind of
slot (the persona kept, as in a call). Per frame and for each: whether its top-1 text token and
each of the agent's 8 audio codebooks agree with the reference's, and the cosine of its logits
with the reference's (the text and the 8 codebooks, averaged). Free-running output is no
measure: on the random tiny checkpoints bf16 and float32 part after a dozen frames anyway.

The last line printed is one JSON object: the format, the frames, the agreement and cosine of
the format and of plain bf16 (`"bf16"`), and the bytes the engines hold: the LM's weights
(`lm_weight_bytes`, against bf16's) and the KV cache of one conversation slot
(`kv_bytes_per_slot`, against a bf16 cache). With `--rows PATH` each frame's figures are also
appended there as a JSON line, and the summary last.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field

import torch

from personaplex.model.config import (
    CODES_PER_STREAM,
    FRAME_SIZE,
    KV_FORMATS,
    PERSONAPLEX_7B,
    WEIGHT_FORMATS,
    ModelConfig,
    SamplingParams,
    load_config,
)
from personaplex.model.loading import load_models, resolve_checkpoint
from personaplex.runtime.audio import frames_of, read_audio
from personaplex.runtime.engine import Engine

from .rows import Rows

logger = logging.getLogger("benchmarks.quality")

SEED = 1234
ROLE = "You enjoy having a good conversation."
STREAMS = 1 + CODES_PER_STREAM  # the text token and the agent's codebooks


@dataclass
class Forced:
    """What the reference's LM took at each live frame."""

    inputs: list[torch.Tensor] = field(default_factory=list)  # [17] the column the temporal transformer read
    prev: list[torch.Tensor] = field(default_factory=list)  # [8] the token each depformer step read


@dataclass(frozen=True)
class Model:
    """How one of the compared models is loaded: its compute dtype, weights and cache."""

    dtype: torch.dtype
    weights: str
    kv_cache: str


def load_engine(args: argparse.Namespace, config: ModelConfig, model: Model) -> Engine:
    files = resolve_checkpoint(args.checkpoint, args.hf_repo)
    models = load_models(files, config, args.device, model.dtype, weights=model.weights)
    return Engine(models, num_slots=1, pinning=True, compile=False, cuda_graphs=False, kv_cache=model.kv_cache)


@torch.inference_mode()
def record(engine: Engine, user: torch.Tensor, voice: str) -> Forced:
    """The reference's call: the prompt, then a frame at a time, sampling; its LM's inputs kept
    (through the LM's own methods, watched for the call's length)."""
    lm, forced = engine.models.lm, Forced()
    embed, depformer_step = lm.embed, lm.depformer_step

    def watched_embed(tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[-1] == 1:  # a live frame (a prompt is one forward of many)
            forced.inputs.append(tokens[0, :, 0].cpu())
        return embed(tokens)

    def watched_step(step: int, prev: torch.Tensor, h: torch.Tensor, cache) -> torch.Tensor:
        if step == 0:
            forced.prev.append(torch.zeros(CODES_PER_STREAM, dtype=torch.long))
        forced.prev[-1][step] = prev[0].cpu()
        return depformer_step(step, prev, h, cache)

    engine.start(0, engine.prompt(engine.voice(voice), ROLE), SamplingParams(seed=SEED), keep_persona=True)
    lm.embed, lm.depformer_step = watched_embed, watched_step  # (instance attributes: `del` restores the methods)
    try:
        for frame in user:
            engine.step(frame[None].to(engine.device))
    finally:
        del lm.embed, lm.depformer_step
    return forced


@torch.inference_mode()
def forced_logits(engine: Engine, forced: Forced, voice: str) -> list[torch.Tensor]:
    """The logits of each live frame [9, V] (text, then the agent's codebooks; audio padded to the
    text's vocabulary with -inf) when the engine's LM is fed the reference's tokens."""
    engine.start(0, engine.prompt(engine.voice(voice), ROLE), SamplingParams(greedy=True), keep_persona=True)
    lm, out = engine.models.lm, []
    for inputs, prev in zip(forced.inputs, forced.prev, strict=True):
        h = lm.forward_embeddings(lm.embed(inputs[None, :, None].to(engine.device)))[:, 0]  # [1, dim]
        streams = [lm.text_logits(h)[0].float().cpu()]
        cache = lm.new_depformer_cache(1, CODES_PER_STREAM)
        for step in range(CODES_PER_STREAM):
            streams.append(lm.depformer_step(step, prev[step : step + 1].to(engine.device), h, cache)[0].float().cpu())
        out.append(streams)
    return out


def agreement(candidate: list[list[torch.Tensor]], reference: list[list[torch.Tensor]]) -> list[dict[str, float]]:
    """Per frame: the text token's top-1 agreement, the audio codebooks' (mean of 8), the mean cosine."""
    frames = []
    for got, want in zip(candidate, reference, strict=True):
        same = [float(g.argmax() == w.argmax()) for g, w in zip(got, want, strict=True)]
        cosine = [float(torch.nn.functional.cosine_similarity(g, w, dim=0)) for g, w in zip(got, want, strict=True)]
        frames.append({"text_top1": same[0], "audio_top1": sum(same[1:]) / CODES_PER_STREAM,
                       "logits_cosine": sum(cosine) / STREAMS})
    return frames


def mean(frames: list[dict[str, float]], key: str) -> float:
    return round(sum(f[key] for f in frames) / len(frames), 4)


def kv_bytes_per_slot(engine: Engine) -> int:
    return engine.kv_bytes() // engine.num_slots


def measure(args: argparse.Namespace, rows: Rows) -> dict:
    config = load_config(args.config) if args.config else PERSONAPLEX_7B
    full = torch.float32 if args.device == "cpu" else torch.bfloat16
    user = torch.from_numpy(frames_of(read_audio(args.input_wav)))[: args.frames]  # [F, 1920]
    rows.emit("setup", device=args.device, frames=len(user), weights=args.weights, kv_cache=args.kv_cache,
              reference=f"{full}".removeprefix("torch."), torch=torch.__version__)
    reference = load_engine(args, config, Model(full, "bf16", "bf16"))
    forced = record(reference, user, args.voice)
    want = forced_logits(reference, forced, args.voice)
    del reference
    figures = {}
    for name, model in (("bf16", Model(torch.bfloat16, "bf16", "bf16")),
                        ("asked", Model(torch.bfloat16, args.weights, args.kv_cache))):
        engine = load_engine(args, config, model)
        frames = agreement(forced_logits(engine, forced, args.voice), want)
        for i, frame in enumerate(frames):
            rows.emit("frame", model=name, frame=i, **frame)
        figures[name] = {"frames": frames, "lm_weight_bytes": engine.weight_bytes(), "kv_bytes_per_slot": kv_bytes_per_slot(engine)}
        del engine
    asked, bf16 = figures["asked"], figures["bf16"]
    return {
        "weights": args.weights, "kv_cache": args.kv_cache, "frames": len(forced.inputs),
        **{key: mean(asked["frames"], key) for key in ("text_top1", "audio_top1", "logits_cosine")},
        "bf16": {key: mean(bf16["frames"], key) for key in ("text_top1", "audio_top1", "logits_cosine")},
        "lm_weight_bytes": asked["lm_weight_bytes"], "lm_weight_bytes_bf16": bf16["lm_weight_bytes"],
        "kv_bytes_per_slot": asked["kv_bytes_per_slot"], "kv_bytes_per_slot_bf16": bf16["kv_bytes_per_slot"],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="a local folder with the release files")
    source.add_argument("--hf-repo", help="a hub repo with the release files (default nvidia/personaplex-7b-v1)")
    p.add_argument("--config", help="model hyper-parameters as JSON (default: the 7B release)")
    p.add_argument("--input-wav", required=True, help="the user's side (any audio format)")
    p.add_argument("--voice", required=True, help="a voice of the checkpoint")
    p.add_argument("--weights", choices=WEIGHT_FORMATS, required=True)
    p.add_argument("--kv-cache", choices=KV_FORMATS, required=True)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--frames", type=int, help=f"at most this many frames of {FRAME_SIZE} samples (default: the whole input)")
    p.add_argument("--rows", help="append each frame's figures to this file as JSON lines")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    with Rows(args.rows) as rows:
        summary = measure(args, rows)
        rows.emit("summary", **summary)
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
