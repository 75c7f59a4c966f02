"""The README's first command on a machine without a CUDA GPU: no model named, the page comes up
working, on the tiny test model, and says so plainly (no red "no CUDA GPU" first screen)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from web import events
from web.values import CUSTOM_VOICE

from .helpers import RunningApp

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the first command loads the 7B")


def test_without_a_gpu_the_first_command_gives_a_working_page_on_the_tiny_model(client, speech):
    app = RunningApp(model=False)
    try:
        app.wait_ready()
        config = httpx.get(f"{app.url}/config").json()
        shown = " ".join(str(c.get("props", {}).get("value")) for c in config["components"] if c["type"] == "markdown")
        call = asyncio.run(client.converse(app.url, speech, 3.0, {"voice": "TESTV0"}))
    finally:
        app.stop()
    assert "This is the tiny test model, not PersonaPlex-7B." in shown and "needs a CUDA GPU" in shown
    assert "Failed" not in shown and "no CUDA GPU found" not in app.output()
    assert not call.refused and call.first_audio_after_s is not None  # it babbles, and the call works


def test_on_a_space_with_persistent_storage_compiled_kernels_are_kept_there(monkeypatch):
    import app

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.setattr(app.os, "access", lambda path, mode: path == "/data")
    app.keep_compiled_kernels()
    assert "TORCHINDUCTOR_CACHE_DIR" not in app.os.environ  # not a Space: torch's own default
    monkeypatch.setenv("SPACE_ID", "someone/personaplex")
    app.keep_compiled_kernels()
    assert app.os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/data/torchinductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    app.keep_compiled_kernels()
    assert app.os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/elsewhere"  # what the owner set wins


def test_a_page_opened_before_the_model_was_ready_gets_its_voices_without_losing_a_choice():
    """The page's one-off voice tick carries the dropdown's value from when it was sent: a voice
    the person chose meanwhile (the custom one, say) must not be set back."""
    from types import SimpleNamespace


    service = SimpleNamespace(status=SimpleNamespace(ready=True), voice_names=lambda: ["NATF2", "NATM1"])
    kept, _ = events.checkpoint_voices(service, "NATM1")
    assert "value" not in kept and ("Custom voice (uploaded)", "Custom voice (uploaded)") in kept["choices"]
    kept, _ = events.checkpoint_voices(service, CUSTOM_VOICE)
    assert "value" not in kept
    replaced, timer = events.checkpoint_voices(service, "TESTV0")  # the placeholder list's voice
    assert replaced["value"] == "NATF2" and timer.active is False
