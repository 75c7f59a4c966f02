"""CUDA only (skipped elsewhere): the graphed engine gives what the eager engine gives."""

from __future__ import annotations

import pytest
import torch

from personaplex.config import TINY
from personaplex.engine import Engine
from personaplex.loading import load_models, resolve_checkpoint
from personaplex.sampling import SamplingParams

from .helpers import CHECKPOINT, user_audio

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def session_tokens(cuda_graphs: bool, greedy: bool) -> torch.Tensor:
    models = load_models(resolve_checkpoint(CHECKPOINT), TINY, "cuda", torch.float32)
    engine = Engine(models, num_slots=4, cuda_graphs=cuda_graphs)
    prompt = engine.prompt(engine.voice("TESTV0"), "You enjoy having a good conversation.")
    engine.start(1, prompt, SamplingParams(greedy=greedy, seed=5))
    tokens = []
    for frame in user_audio(12, seed=9):
        batch = torch.zeros(2, frame.numel())
        batch[1] = frame
        tokens.append(engine.step(batch, bucket=2).tokens[1].cpu())
    return torch.stack(tokens)


@pytest.mark.parametrize("greedy", [True, False])
def test_cuda_graphs_replay_what_eager_computes(greedy):
    assert torch.equal(session_tokens(True, greedy), session_tokens(False, greedy))
