"""Shared fixtures: the tiny golden checkpoint (release format), its expected outputs, helpers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from personaplex.model.config import TINY
from personaplex.model.loading import Models, load_models, resolve_checkpoint

from .helpers import CHECKPOINT, ROOT, TINY_DIR, RunningApp, load_client

torch.set_num_threads(1)  # small tensors: one thread is faster and timing-stable on 2 cores


@pytest.fixture(scope="session")
def expected() -> dict[str, torch.Tensor]:
    return load_file(str(TINY_DIR / "expected.safetensors"))


@pytest.fixture(scope="session")
def expected_json() -> dict:
    return json.loads((TINY_DIR / "expected.json").read_text())


@pytest.fixture(scope="session")
def models() -> Models:
    """The tiny golden checkpoint loaded through the public API, float32 on CPU."""
    return load_models(resolve_checkpoint(CHECKPOINT), TINY, "cpu", torch.float32)


@pytest.fixture(autouse=True)
def _no_leftover_streaming(request: pytest.FixtureRequest):
    """Engines put the shared tiny models in streaming mode; leave them as found."""
    yield
    if "models" in request.fixturenames:
        from personaplex.model.streaming import disable_streaming

        loaded = request.getfixturevalue("models")
        disable_streaming(loaded.mimi)
        disable_streaming(loaded.lm)
        loaded.lm.transformer.pinning = False
        loaded.lm.transformer.prefix_attention = False
        loaded.lm.transformer.set_kv_cache("bf16")


@pytest.fixture(scope="session")
def running_app():
    """The app on the tiny checkpoint, started once for the WebRTC and browser tests."""
    app = RunningApp()
    try:
        app.wait_ready()
        yield app
    finally:
        app.stop()


@pytest.fixture(scope="session")
def client():
    """The WebRTC client of examples/ (the browser's exact signalling)."""
    return load_client()


@pytest.fixture(scope="session")
def speech(client):
    """Real speech at 48 kHz, as a microphone sends it."""
    return client.load_48k(str(ROOT / "examples" / "user_question.wav"))
