"""The tick's hot pieces, eager or compiled by `torch.compile`, and what to do when compiling fails.

Implements:
  * `compile_enabled`: whether the engine compiles by default (`PERSONAPLEX_COMPILE`);
    `prefix_route`: whether its attention then reads only what each slot holds;
  * `TickPieces`: the four pieces of a tick that a compiler takes over: Mimi's frame encode and
    decode, one temporal layer of a one-step call (its graph shared by every layer, whose weights
    are its inputs) and the heads (the text token and the depformer); `eager_pieces`,
    `compiled_pieces` (each piece one graph: for every bucket, or one per bucket, `batch_graphs`);
  * `compile_tick`: compile them and warm every bucket; when that fails, try again in steps, each
    said in `Compiled`: the layers alone with masked attention instead of the flex kernel; one
    graph per bucket (flex again, then masked); and at last the eager pieces. A slower engine is
    better than none.
The model knows nothing of this: it takes the pieces as arguments (`LMGen.step(layer=, heads=)`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..model.generate import Heads, LMGen
from ..model.mimi import Mimi
from ..model.transformer import LayerRunner, run_layer
from .batch_graphs import compile_piece

logger = logging.getLogger(__name__)


def compile_enabled(device: torch.device) -> bool:
    """`torch.compile` of the tick's hot pieces: on CUDA unless PERSONAPLEX_COMPILE=0; on a CPU
    only with PERSONAPLEX_COMPILE=1 (compiling takes a minute or more there, and the page
    should come up at once on a laptop)."""
    value = os.environ.get("PERSONAPLEX_COMPILE", "").lower()
    return value in ("1", "yes", "true") or (device.type == "cuda" and value not in ("0", "no", "false"))


def prefix_route(asked: bool | None, compiling: bool, pinning: bool, device: torch.device) -> bool:
    """Whether the LM's one-step attention reads only what each slot holds (flex attention):
    as `asked`, or (None) when compiled, where it is fast (eagerly the masked path is faster);
    never for pinned slots compiled on a CPU (Inductor's CPU flex kernel gives no log-sum-exp
    to merge the pinned query with the other)."""
    wanted = compiling if asked is None else asked
    return wanted and not (pinning and compiling and device.type == "cpu")


@dataclass(frozen=True)
class TickPieces:
    encode: Callable[[torch.Tensor], torch.Tensor]  # pcm [B, 1, 1920] -> codes [B, 8, 1]
    decode: Callable[[torch.Tensor], torch.Tensor]  # codes [B, 8, 1] -> pcm [B, 1, 1920]
    layer: LayerRunner
    heads: Heads
    compiled: bool = False


def eager_pieces(mimi: Mimi, gen: LMGen) -> TickPieces:
    return TickPieces(mimi.encode, mimi.decode, run_layer, gen.heads)


def compiled_pieces(mimi: Mimi, gen: LMGen, every_batch: bool) -> TickPieces:
    """Each piece one full graph, compiled at its first call: one for every batch size
    (`every_batch`, within `batch_graphs.tracing_every_batch`) or one per batch size."""
    return TickPieces(compile_piece(mimi.encode, every_batch), compile_piece(mimi.decode, every_batch),
                      compile_piece(run_layer, every_batch), compile_piece(gen.heads, every_batch), compiled=True)


@dataclass
class Compiled:
    """What compiling the tick gave: the pieces to run, and what failed on the way (None: nothing)."""

    pieces: TickPieces
    every_batch: bool  # each piece one graph for every bucket
    failed: str | None = None  # nothing could be compiled: the pieces are the eager ones
    prefix_failed: str | None = None  # the flex kernel: attention over every ring entry instead
    every_batch_failed: str | None = None  # one graph for every bucket: one per bucket instead


Warm = Callable[[TickPieces], str | None]  # runs the pieces at every bucket; what failed, if anything


def compile_tick(mimi: Mimi, gen: LMGen, every_batch: bool, drop_flex: bool, warm: Warm, graphs: int) -> Compiled:
    """Compile the tick's pieces and `warm` them; if that fails, the fallbacks (module docstring).
    `drop_flex`: the flex kernel may be given up (it was not asked for explicitly); `graphs`: the
    most graphs one piece may need (a graph per bucket, and room), allowed while this runs."""
    mimi.fill_caches()  # computed eagerly, so that no graph guards on them
    prefix = gen.prefix_attention
    limit = torch._dynamo.config.recompile_limit
    with torch._dynamo.config.patch(recompile_limit=max(limit, graphs)):
        result = _attempt(mimi, gen, every_batch, drop_flex and prefix, warm)
        if result.failed is not None and every_batch:
            logger.warning("trying again with one graph per bucket")
            gen.use_prefix_attention(prefix)  # flex was not to blame
            again = _attempt(mimi, gen, False, drop_flex and prefix, warm)
            again.every_batch_failed = result.failed
            result = again
    if result.failed is not None:
        logger.warning("running the engine step eagerly")
        result.pieces = eager_pieces(mimi, gen)
        gen.use_prefix_attention(prefix and not drop_flex)  # eagerly the masked path is the faster
    return result


def _attempt(mimi: Mimi, gen: LMGen, every_batch: bool, drop_flex: bool, warm: Warm) -> Compiled:
    """Compile every piece and warm them; if that fails and `drop_flex`, the layers alone again
    with attention over every ring entry (the other pieces keep their graphs)."""
    result = Compiled(compiled_pieces(mimi, gen, every_batch), every_batch)
    result.failed = warm(result.pieces)
    if result.failed is not None and drop_flex:
        logger.warning("trying again with attention over every ring entry")
        result.prefix_failed = result.failed
        gen.use_prefix_attention(False)
        result.pieces = replace(result.pieces, layer=compile_piece(run_layer, every_batch))
        result.failed = warm(result.pieces)
    return result
