"""Engine replicas on Ray Serve (personaplex/cluster.py) on a CPU: a local Ray started by the
launcher as a user starts it, 2 replicas of the tiny checkpoint with 2 slots each; calls through
Serve's proxy over the /api/chat protocol; a replica killed; the page in front (--engine-url)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="the cluster needs ray[serve] (requirements-cluster.txt)")

from examples.chat_client import talk

from .helpers import (
    CALL_BUTTON,
    CHECKPOINT,
    CHROMIUM,
    ROOT,
    START_TILE,
    TINY_CONFIG,
    RunningApp,
    browser,
    choose,
    free_port,
    without_torch,
)

REPLICA = "ServeReplica:personaplex:EngineReplica"  # the title Ray gives a replica's process


class Cluster:
    """`python -m personaplex.cluster` in a subprocess, as the README starts it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.http = f"http://127.0.0.1:{self.port}"
        self.url = f"ws://127.0.0.1:{self.port}/api/chat"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        args = [sys.executable, "-m", "personaplex.cluster", "--checkpoint", str(CHECKPOINT), "--config", str(TINY_CONFIG),
                "--device", "cpu", "--replicas", "2", "--max-sessions", "2", "--cpus-per-replica", "0.5",
                "--port", str(self.port)]
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, cwd=str(ROOT),
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                status = httpx.get(self.http + "/api/status", timeout=2).json()
                if status.get("ready") and status.get("replicas") == 2:  # both replicas, not only the first
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"the cluster did not start:\n{self.output()[-4000:]}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        c.wait_ready()
        yield c
    finally:
        c.stop()


def replicas() -> list[int]:
    """The replicas' processes (Ray names them in their command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and REPLICA in (entry / "cmdline").read_text(errors="replace"):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile
            continue
    return found


def silence_call(url: str, seconds: float, **query: str):
    return talk(url, {"voice_prompt": "TESTV0.pt", **query}, np.zeros(0, np.float32), seconds)


def wait_until_ready_again(cluster: Cluster, timeout: float = 120) -> None:
    time.sleep(2.0)  # Serve's controller notices the dead replicas
    cluster.wait_ready(timeout)


def test_the_launcher_serves_the_protocol_through_serves_proxy(cluster):
    routes = httpx.get(cluster.http + "/-/routes", timeout=10).json()
    assert routes == {"/": "personaplex"}
    status = httpx.get(cluster.http + "/api/status", timeout=10).json()
    assert status["ready"] and status["voices"] == ["TESTV0"] and status["slots"] == 2 and status["replicas"] == 2
    assert len(replicas()) == 2


def test_five_calls_at_once_four_are_served_and_the_fifth_is_refused_at_once_with_its_reason(cluster):
    async def five():
        async def call(i: int):
            await asyncio.sleep(0.02 * i)  # at once, as people press the button
            began = time.monotonic()
            result = await silence_call(cluster.url, 4.0)
            return result, time.monotonic() - began

        return await asyncio.gather(*(call(i) for i in range(5)))

    results = asyncio.run(five())
    served = [r for r, _ in results if r.error is None]
    refused = [(r, took) for r, took in results if r.error is not None]
    assert len(served) == 4 and all(r.seconds > 3.5 for r in served), [(r.error, r.handshake_s, r.closed, took) for r, took in results]
    assert len(refused) == 1
    (result, took), = refused
    assert "every engine" in result.error and result.handshake_s is None and took < 5.0


def test_a_custom_voice_sent_to_one_replica_works_on_every_replica(cluster):
    clip = (ROOT / "examples" / "voice_sample.wav").read_bytes()
    answer = httpx.post(cluster.http + "/api/voices?owner=page-1", content=clip, timeout=60).json()
    assert answer["key"].startswith("custom:") and 5 <= answer["seconds"] <= 30

    async def two():  # two calls at once: one replica each, one of them has never seen the clip
        calls = [silence_call(cluster.url, 2.0, voice_prompt=answer["key"]) for _ in range(2)]
        return await asyncio.gather(*calls)

    assert all(r.error is None and r.seconds > 1.5 for r in asyncio.run(two()))
    made_up = asyncio.run(silence_call(cluster.url, 1.0, voice_prompt="custom:" + "0" * 32))
    assert made_up.handshake_s is None and "no longer available" in made_up.error
    bad = httpx.post(cluster.http + "/api/voices?owner=page-1", content=b"not audio", timeout=60)
    assert bad.status_code == 422 and bad.json()["error"]


def test_a_killed_replica_ends_its_call_and_the_next_calls_are_served(cluster):
    async def scene():
        calls = []
        for _ in range(2):  # one call on each replica
            calls.append(asyncio.create_task(silence_call(cluster.url, 6.0)))
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)
        os.kill(replicas()[0], signal.SIGKILL)  # the replica's process dies, as on a lost GPU node
        killed_at = time.monotonic()
        first = await asyncio.gather(*calls)
        after = await asyncio.gather(*(silence_call(cluster.url, 2.0) for _ in range(2)))
        return first, after, killed_at

    first, after, _ = asyncio.run(scene())
    lengths = sorted(r.seconds for r in first)
    assert lengths[0] < 4.5 and lengths[1] > 5.5  # the killed replica's call ended early; the other went on
    assert all(r.error is None and r.seconds > 1.5 for r in after)  # new calls go to the live replica
    wait_until_ready_again(cluster)


@pytest.fixture(scope="module")
def front(cluster):
    """The page with no model of its own, every call sent to the cluster, in a Python without torch."""
    app = RunningApp("--engine-url", cluster.url, model=False, env=without_torch())
    try:
        app.wait_ready(marker="ready: the engine cluster")
        yield app
    finally:
        app.stop()


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (run_tests.sh installs it as root)")
def test_the_page_in_front_in_a_browser_a_custom_voice_a_call_its_captions_and_its_recording(front, tmp_path):
    import re

    import soxr
    from playwright.sync_api import expect, sync_playwright

    from personaplex.runtime.audio import read_audio, write_wav

    mic = tmp_path / "mic.wav"
    write_wav(mic, soxr.resample(read_audio(ROOT / "examples" / "user_question.wav"), 24000, 48000), 48000)
    with sync_playwright() as p:
        ctx, profile = browser(p, mic, {"width": 1280, "height": 1100})
        try:
            page = ctx.new_page()
            page.goto(front.url)
            expect(page.locator("#status")).to_contain_text("engine cluster", timeout=30_000)
            expect(page.locator("#remote_note")).to_contain_text("Calls from this page go to an engine cluster")
            expect(page.locator("#preview")).to_have_count(0)  # no model here: no previews
            choose(page, "persona", "Restaurant reservations")
            page.get_by_text("Custom voice", exact=True).first.click()
            page.locator("#consent input").check()
            page.locator("#voice_clip input[type=file]").set_input_files(str(ROOT / "examples" / "voice_sample.wav"))
            expect(page.locator("#voice_status")).to_contain_text("Custom voice ready", timeout=30_000)  # encoded by the cluster
            expect(page.locator("#voice input")).to_have_value("Custom voice (uploaded)", timeout=15_000)
            page.locator(START_TILE).click()  # one click: the microphone, then the call
            button = page.locator(CALL_BUTTON)
            expect(button).to_contain_text("End the call", timeout=20_000)
            expect(page.locator("#live .verdict")).to_contain_text(re.compile("real time|falling behind|dropping audio"),
                                                                   timeout=20_000)
            expect(page.locator("#conversation [data-testid='bot']").first).to_contain_text(re.compile(r"^\d:\d\d · "),
                                                                                          timeout=15_000)
            page.wait_for_timeout(3000)
            (ROOT / "tests" / "artifacts").mkdir(exist_ok=True)
            page.screenshot(path=str(ROOT / "tests" / "artifacts" / "front.png"), full_page=True)
            button.click()
            expect(page.locator("#live [data-ending='stopped']")).to_contain_text("You ended the call.")
            expect(page.locator("#recording a")).to_have_attribute("href", re.compile(r"call\.wav$"), timeout=10_000)
            expect(page.locator("#transcript_file a")).to_have_attribute("href", re.compile(r"transcript\.txt$"))
            page.screenshot(path=str(ROOT / "tests" / "artifacts" / "front-after-the-call.png"), full_page=True)
        finally:
            ctx.close()
            shutil.rmtree(profile, ignore_errors=True)


def test_two_pages_in_front_share_the_cluster(cluster, front, client, speech):
    other = RunningApp("--engine-url", cluster.url, model=False, env=without_torch())
    try:
        other.wait_ready(marker="ready: the engine cluster")

        async def both():
            return await asyncio.gather(*(client.converse(url, speech, 4.0, {"voice": "TESTV0"}) for url in (front.url, other.url)))

        results = asyncio.run(both())
        assert all(r.ended is None and r.audio.size / client.RATE > 2.5 for r in results)
    finally:
        other.stop()


def test_the_page_in_front_holds_a_webrtc_call_with_real_speech_and_says_when_the_engines_die(cluster, front, client,
                                                                                              speech):
    result = asyncio.run(client.converse(front.url, speech, 8.0, {"voice": "TESTV0"}))
    assert result.ended is None and result.audio.size / client.RATE > 6.5
    loud = np.abs(result.audio) > 0.01
    assert loud.mean() > 0.2  # the model's audio, from a replica
    assert any(m["role"] == "assistant" for m in result.conversation) and "Model" in result.live
    assert result.recording_url

    async def lost():  # every replica dies during a call: the page says why the call ended
        watched = asyncio.create_task(client.converse(front.url, speech, 8.0, {"voice": "TESTV0"}))
        await asyncio.sleep(3.0)
        for pid in replicas():
            os.kill(pid, signal.SIGKILL)
        return await watched

    try:
        ended = asyncio.run(lost())
        assert ended.ended and "the engine serving this call stopped" in ended.ended
    finally:
        wait_until_ready_again(cluster)


def test_the_sample_configs_are_what_the_builder_takes():
    import yaml

    from personaplex.serve.cluster import ClusterConfig, build_app

    serve_yaml = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    kuberay = yaml.safe_load((ROOT / "deploy" / "rayservice.yaml").read_text())
    embedded = yaml.safe_load(kuberay["spec"]["serveConfigV2"])
    for config in (serve_yaml, embedded):
        (application,) = config["applications"]
        assert application["import_path"] == "personaplex.serve.cluster:build_app"
        settings = ClusterConfig.from_args(application["args"])
        assert settings.device == "cuda" and settings.max_replicas == 8 and settings.target_calls == 24.0
        build_app(application["args"])  # the application and its deployments, as Serve builds them
    with pytest.raises(ValueError, match="unknown cluster settings: replica"):
        ClusterConfig.from_args({"replica": "2"})
    assert ClusterConfig.from_args({"replicas": "2", "max_sessions": "2", "device": "cpu"}).slots == 2
