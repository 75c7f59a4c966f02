"""`python -m personaplex.offline`: a recorded user side in, the agent's side out.

Implements the reference's offline CLI (same flags, same outputs: a mono 24 kHz wav exactly as
long as the input, and a JSON list with one string per frame: "PAD", "EPAD" or the piece) and
`converse`, its frame loop on one slot of an engine (the long-call benchmark runs it too; the
app's offline tab goes through the service's engine thread instead, `Service.run_offline`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..model.config import (
    DEFAULT_TEXT_PROMPT,
    FRAME_SIZE,
    KV_FORMATS,
    PERSONAPLEX_7B,
    WEIGHT_FORMATS,
    SamplingParams,
    load_config,
    random_seed,
)
from ..model.generate import PromptFrames
from ..model.loading import DEFAULT_REPO, CheckpointError, load_models, resolve_checkpoint, voice_files
from ..model.persona import VoicePrompt
from ..model.text import Words
from ..runtime.audio import frames_of, read_audio, write_wav
from ..runtime.capacity import check_formats
from ..runtime.engine import Engine

logger = logging.getLogger("personaplex.offline")
PROGRESS_MIN_FRAMES = 125  # show a progress bar from 10 s of input


@dataclass
class Conversation:
    pcm: np.ndarray  # [T] float32 agent audio, as long as the user's
    text_ids: list[int]  # one text id per 80 ms frame


def converse(
    engine: Engine,
    user_pcm: np.ndarray,
    prompt: PromptFrames,
    sampling: SamplingParams,
    slot: int = 0,
    on_frame: Callable[[int, int], None] | None = None,
    keep_persona: bool = False,
) -> Conversation:
    """Run `user_pcm` (float32 [T] at 24 kHz) through one slot of the engine, frame by frame;
    with `keep_persona` (an engine made with `pinning=True`) the prompt stays for the whole call."""
    frames = frames_of(user_pcm)
    engine.start(slot, prompt, sampling, keep_persona=keep_persona)
    batch = torch.zeros(engine.num_slots, FRAME_SIZE)
    pcm_out, text_out = [], []
    for i, frame_in in enumerate(frames):
        batch[slot] = torch.from_numpy(frame_in)
        frame = engine.step(batch)
        pcm_out.append(frame.pcm[slot].float().cpu())
        text_out.append(frame.text[slot].cpu())
        if on_frame is not None:
            on_frame(i + 1, len(frames))
    pcm = torch.cat(pcm_out).numpy()[: user_pcm.size]
    return Conversation(pcm=pcm, text_ids=[int(t) for t in text_out])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m personaplex.offline", description=__doc__.splitlines()[0])
    p.add_argument("--input-wav", required=True, help="the user's side of the conversation (any audio format)")
    p.add_argument("--output-wav", required=True, help="where to write the agent's audio (mono, 24 kHz)")
    p.add_argument("--output-text", required=True, help="where to write the agent's text (JSON, one entry per frame)")
    p.add_argument("--voice-prompt", required=True, help="a voice of the checkpoint (NATF2 or NATF2.pt) or a .pt / audio file")
    p.add_argument("--voice-prompt-dir", help="look voice names up in this folder instead of the checkpoint's voices")
    p.add_argument("--text-prompt", default=DEFAULT_TEXT_PROMPT, help="the role prompt (may be empty)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="a local folder with the release file names")
    source.add_argument("--hf-repo", default=None, help=f"a hub repo with the release files (default {DEFAULT_REPO})")
    p.add_argument("--config", help="model hyper-parameters as JSON, in the reference's names (default: the 7B release)")
    p.add_argument("--seed", type=int, default=-1, help="random seed (-1: a fresh one)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    defaults = SamplingParams()
    p.add_argument("--temp-audio", type=float, default=defaults.temp_audio)
    p.add_argument("--temp-text", type=float, default=defaults.temp_text)
    p.add_argument("--topk-audio", type=int, default=defaults.topk_audio)
    p.add_argument("--topk-text", type=int, default=defaults.topk_text)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="what the LM computes in (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--weights", choices=WEIGHT_FORMATS, default="bf16",
                   help="the LM's weights: as loaded (bf16, the default), or 8-bit (int8, fp8: quantized at load)")
    p.add_argument("--kv-cache", choices=KV_FORMATS, default="bf16", help="the LM's KV cache: the LM's dtype, or fp8")
    p.add_argument("--keep-persona", action="store_true",
                   help="keep the system prompt in the model's window past its 4-minute context (default: it slides out, as in the reference)")
    return p


def _voice(engine: Engine, value: str, voice_dir: str | None) -> VoicePrompt:
    """A name of the voice table (with or without `.pt`), else a file path given by the user."""
    table = voice_files(Path(voice_dir)) if voice_dir else engine.models.voices
    name = value[:-3] if value.endswith(".pt") else value
    if name in table:
        return engine.voice_from_file(table[name])
    path = Path(value)
    if path.is_file():
        return engine.voice_from_file(path)
    known = ", ".join(table) or "none"
    raise CheckpointError(f"unknown voice prompt {value!r}: no such voice (available: {known}) and no such file")


def run(args: argparse.Namespace) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("--device cuda was asked for but no CUDA GPU is available: use --device cpu")
    seed = args.seed if args.seed != -1 else random_seed()
    sampling = SamplingParams(args.temp_text, args.topk_text, args.temp_audio, args.topk_audio, args.greedy, seed)
    config = load_config(args.config) if args.config else PERSONAPLEX_7B
    user_pcm = read_audio(args.input_wav)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    check_formats(torch.device(args.device), args.weights, args.kv_cache)
    models = load_models(resolve_checkpoint(args.checkpoint, args.hf_repo), config, args.device, dtype, weights=args.weights)
    engine = Engine(models, num_slots=1, pinning=args.keep_persona, kv_cache=args.kv_cache)
    prompt = engine.prompt(_voice(engine, args.voice_prompt, args.voice_prompt_dir), args.text_prompt)
    frames = -(-user_pcm.size // FRAME_SIZE)
    from tqdm import tqdm

    with tqdm(total=frames, unit="frame", disable=frames < PROGRESS_MIN_FRAMES or None) as bar:
        result = converse(engine, user_pcm, prompt, sampling, on_frame=lambda done, total: bar.update(1),
                          keep_persona=args.keep_persona)
    write_wav(args.output_wav, result.pcm)
    labels = [Words(models.tokenizer).label(t) for t in result.text_ids]
    Path(args.output_text).write_text(json.dumps(labels, ensure_ascii=False))
    logger.info("wrote %s (%.2f s) and %s (%d frames)", args.output_wav, result.pcm.size / 24000, args.output_text, len(labels))


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        with torch.inference_mode():
            run(args)
    except UserError as exc:  # a bad file, setting or checkpoint: its message says what to do
        logger.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
