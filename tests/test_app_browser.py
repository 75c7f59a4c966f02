"""The page in headless Chromium (Debian's, never a downloaded one) with a fake microphone:
pick a persona and a voice, upload voices (bad ones first), start a call, hear audio, read the
transcript, download the recording; bad inputs show their messages and the page stays usable."""

from __future__ import annotations

import io
import re
import shutil
import tempfile
import wave
from pathlib import Path

import pytest

from personaplex.audio import write_wav

from .helpers import ROOT, tone

CHROMIUM = Path("/usr/bin/chromium")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (run_tests.sh installs it as root)"),
]
SCREENSHOT = ROOT / "tests" / "artifacts" / "conversation.png"
CAPTURE_STATS = """
window.__pcs = [];
const Original = window.RTCPeerConnection;
window.RTCPeerConnection = function (...args) { const pc = new Original(...args); window.__pcs.push(pc); return pc; };
window.RTCPeerConnection.prototype = Original.prototype;
"""
INBOUND_ENERGY = """async () => {
  let energy = 0;
  for (const pc of window.__pcs) {
    const stats = await pc.getStats();
    stats.forEach(r => { if (r.type === 'inbound-rtp' && r.kind === 'audio') energy += r.totalAudioEnergy || 0; });
  }
  return energy;
}"""




@pytest.fixture
def files(tmp_path):
    mic = tmp_path / "mic.wav"
    import soxr

    from personaplex.audio import read_audio

    write_wav(mic, soxr.resample(read_audio(ROOT / "examples" / "user_question.wav"), 24000, 48000), 48000)
    notes = tmp_path / "notes.txt"
    notes.write_text("these are my meeting notes, not audio\n" * 20)
    short = tmp_path / "short.wav"
    write_wav(short, tone(1.0, 24000)[0])
    return {"mic": mic, "notes": notes, "short": short, "voice": ROOT / "examples" / "voice_sample.wav"}


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def test_a_conversation_in_the_browser(running_app, files):
    from playwright.sync_api import expect, sync_playwright

    SCREENSHOT.parent.mkdir(exist_ok=True)
    profile = tempfile.mkdtemp()
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={files['mic']}",
            "--autoplay-policy=no-user-gesture-required"]
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(profile, executable_path=str(CHROMIUM), headless=True, args=args,
                                                   permissions=["microphone"], viewport={"width": 1280, "height": 1100})
        try:
            page = ctx.new_page()
            page.add_init_script(CAPTURE_STATS)
            page.goto(running_app.url)
            expect(page.locator("#status")).to_contain_text("Ready", timeout=30_000)

            choose(page, "persona", "Restaurant reservations")
            expect(page.locator("#role textarea")).to_have_value(re.compile("Luigi's Trattoria"))
            choose(page, "voice", "TESTV0")

            # Custom voice: refused without consent, then bad files, then a good one.
            page.get_by_text("Custom voice", exact=True).first.click()
            upload = page.locator("#voice_file input[type=file]")
            upload.set_input_files(str(files["voice"]))
            expect(page.locator("#voice_status")).to_contain_text("Tick the consent box first")
            page.locator("#consent input").check()
            page.locator("#voice_file button[aria-label='Clear']").click()
            upload.set_input_files(str(files["notes"]))
            expect(page.locator("#voice_status")).to_contain_text(re.compile("notes.txt (is not an audio file|could not be decoded)"))
            page.locator("#voice_file button[aria-label='Clear']").click()
            upload.set_input_files(str(files["short"]))
            expect(page.locator("#voice_status")).to_contain_text("use at least 2 s of speech")
            page.locator("#voice_file button[aria-label='Clear']").click()
            upload.set_input_files(str(files["voice"]))
            expect(page.locator("#voice_status")).to_contain_text("Custom voice ready", timeout=20_000)
            expect(page.locator("#voice input")).to_have_value("Custom voice (uploaded)")

            # A role text over the limit: flagged while typing, refused at the start, then fixed.
            role = page.locator("#role textarea")
            good_role = role.input_value()
            role.fill("You are a very talkative guide. " * 40)
            expect(page.locator("#role_count")).to_contain_text("too long")
            page.get_by_text("Click to Access Microphone").click()
            page.locator("#webrtc button[aria-label='start stream']").click()
            expect(page.locator("#health")).to_contain_text("the limit is 1000", timeout=20_000)
            page.wait_for_timeout(1500)
            role.fill(good_role)
            expect(page.locator("#role_count")).not_to_contain_text("too long")

            # The call.
            start = page.locator("#webrtc button[aria-label='start stream']")
            expect(start).to_be_visible(timeout=10_000)
            start.click()
            expect(page.locator("#health")).to_contain_text("engine tick", timeout=20_000)
            energy_before = page.evaluate(INBOUND_ENERGY)
            page.wait_for_timeout(2500)
            assert page.evaluate(INBOUND_ENERGY) > energy_before  # audio is flowing in
            expect(page.locator("#transcript textarea")).not_to_have_value("", timeout=10_000)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            stop = page.locator("#webrtc button[aria-label='start stream']")  # the same button, now "Stop"
            expect(stop).to_contain_text("Stop")
            stop.click()
            link = page.locator("#recording a")
            expect(link).to_have_attribute("href", re.compile(r"call\.wav$"), timeout=10_000)
            expect(page.locator("#transcript_file a")).to_have_attribute("href", re.compile(r"transcript\.txt$"))
            recording = page.request.get(link.get_attribute("href")).body()
            with wave.open(io.BytesIO(recording)) as w:
                assert w.getnchannels() == 2 and w.getframerate() == 24000 and w.getnframes() > 24000
        finally:
            ctx.close()
            shutil.rmtree(profile, ignore_errors=True)


def test_the_offline_tab_in_the_browser(running_app):
    from playwright.sync_api import expect, sync_playwright

    profile = tempfile.mkdtemp()
    args = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(profile, executable_path=str(CHROMIUM), headless=True, args=args,
                                                   viewport={"width": 1280, "height": 1300})
        try:
            page = ctx.new_page()
            page.goto(running_app.url)
            expect(page.locator("#status")).to_contain_text("Ready", timeout=30_000)
            choose(page, "voice", "TESTV0")
            page.get_by_role("tab", name="Offline").click()
            page.locator("#offline_in input[type=file]").set_input_files(str(ROOT / "examples" / "user_question.wav"))
            page.locator("#offline_run").click()
            expect(page.locator("#offline_text textarea")).not_to_have_value("", timeout=60_000)
            for name in ("model.wav", "both.wav", "transcript.txt"):
                expect(page.locator(f"#offline_files a[href$='{name}']")).to_have_count(1)
        finally:
            ctx.close()
            shutil.rmtree(profile, ignore_errors=True)
