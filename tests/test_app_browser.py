"""The page in headless Chromium (Debian's, never a downloaded one) with a fake microphone:
pick a persona and a voice, hear a preview, add a custom voice (consent after the upload, bad
files refused and cleared), start a call with one click, see who speaks and the conversation
turn by turn, download the recording; on a phone the start control and the conversation are on
the first screen. Screenshots of both go to tests/artifacts/."""

from __future__ import annotations

import io
import re
import shutil
import wave

import pytest

from personaplex.runtime.audio import write_wav

from .helpers import CALL_BUTTON, CHROMIUM, ROOT, START_TILE, browser, choose, tone

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (run_tests.sh installs it as root)"),
]
ARTIFACTS = ROOT / "tests" / "artifacts"  # screenshots of the page in a call, desktop and phone
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




PHONE = {"width": 390, "height": 844}


@pytest.fixture
def files(tmp_path):
    mic = tmp_path / "mic.wav"
    import soxr

    from personaplex.runtime.audio import read_audio

    write_wav(mic, soxr.resample(read_audio(ROOT / "examples" / "user_question.wav"), 24000, 48000), 48000)
    notes = tmp_path / "notes.txt"  # the browser refuses it
    notes.write_text("these are my meeting notes, not audio\n" * 20)
    fake = tmp_path / "notes.wav"  # the browser takes it; the server finds it is not audio
    fake.write_text("these are my meeting notes, not audio\n" * 20)
    short = tmp_path / "short.wav"
    write_wav(short, tone(3.0, 24000)[0])
    return {"mic": mic, "notes": notes, "fake": fake, "short": short, "voice": ROOT / "examples" / "voice_sample.wav"}


def in_view(page, selector: str, viewport: dict, at_least_px: float = 0) -> bool:
    """The element's top is on the first screen, with `at_least_px` of it showing."""
    box = page.locator(selector).bounding_box()
    return box is not None and box["y"] >= 0 and box["y"] + min(box["height"], at_least_px) <= viewport["height"]


def test_a_conversation_in_the_browser(running_app, files):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        ctx, profile = browser(p, files["mic"], {"width": 1280, "height": 1100})
        try:
            page = ctx.new_page()
            page.add_init_script(CAPTURE_STATS)
            page.goto(running_app.url)
            expect(page.locator("#status")).to_contain_text("Ready", timeout=30_000)
            expect(page.locator("#status")).to_contain_text("conversations at once")

            choose(page, "persona", "Restaurant reservations")
            expect(page.locator("#role textarea")).to_have_value(re.compile("Luigi's Trattoria"))
            choose(page, "voice", "TESTV0")
            page.locator("#preview").click()  # the model greets us in that voice
            expect(page.locator("#preview_audio")).to_contain_text("0:04", timeout=30_000)  # a 4 s clip, ready to play

            # Custom voice: the clip waits for the consent box, which then applies it; bad files
            # get their message and leave the box; the voice in use can be played back.
            page.get_by_text("Custom voice", exact=True).first.click()
            upload = page.locator("#voice_clip input[type=file]")
            upload.set_input_files(str(files["voice"]))
            expect(page.locator("#voice_status")).to_contain_text("Tick the consent box to use this clip")
            page.locator("#consent input").check()
            expect(page.locator("#voice_status")).to_contain_text("Custom voice ready", timeout=20_000)
            expect(page.locator("#voice input")).to_have_value("Custom voice (uploaded)", timeout=15_000)
            expect(page.locator("#voice_in_use")).to_contain_text(re.compile("0:0[89]"))  # the 8.6 s clip, as the model hears it
            page.locator("#voice_clip button[aria-label='Clear']").click()
            upload.set_input_files(str(files["notes"]))
            expect(page.get_by_text("Invalid file type")).to_be_visible()
            for name, message in [("fake", re.compile("notes.wav (is not an audio file|could not be decoded)")),
                                  ("short", "use at least 5 s of speech")]:
                upload.set_input_files(str(files[name]))
                expect(page.locator("#voice_status")).to_contain_text(message)
                expect(page.locator("#voice_status")).to_contain_text("The previous custom voice is kept")
                expect(upload).to_have_count(1)  # the rejected file left the box: it takes a new one
            expect(page.locator("#voice input")).to_have_value("Custom voice (uploaded)", timeout=15_000)

            # A role text over the limit: flagged while typing, refused at the start (one click), then fixed.
            role = page.locator("#role textarea")
            good_role = role.input_value()
            role.fill("You are a very talkative guide. " * 40)
            expect(page.locator("#role_count")).to_contain_text("too long")
            page.locator(START_TILE).click()
            expect(page.locator("#live")).to_contain_text("the limit is 1000", timeout=20_000)
            page.wait_for_timeout(1500)
            role.fill(good_role)
            expect(page.locator("#role_count")).not_to_contain_text("too long")

            # The call: who is speaking, the verdict, the conversation turn by turn.
            button = page.locator(CALL_BUTTON)
            expect(button).to_contain_text("Start the call", timeout=10_000)
            button.click()
            expect(button).to_contain_text("End the call", timeout=20_000)
            expect(page.locator("#live .verdict")).to_contain_text(re.compile("real time|falling behind|dropping audio"),
                                                                   timeout=20_000)
            expect(page.locator("#live .who.speaking")).not_to_have_count(0, timeout=10_000)
            energy_before = page.evaluate(INBOUND_ENERGY)
            page.wait_for_timeout(2500)
            assert page.evaluate(INBOUND_ENERGY) > energy_before  # audio is flowing in
            model_turn = page.locator("#conversation [data-testid='bot']").first
            expect(model_turn).to_contain_text(re.compile(r"^\d:\d\d · "), timeout=10_000)
            expect(page.locator("#conversation [data-testid='user']").first).to_contain_text("spoke for", timeout=15_000)
            page.get_by_text("Call details", exact=True).click()
            expect(page.locator("#details")).to_contain_text("engine tick")
            expect(page.locator("#details")).to_contain_text("connection")
            expect(page.locator("#status")).to_contain_text(re.compile("1 of 2 conversations in progress"))
            expect(page.locator("#mute")).to_contain_text("Mute my microphone")
            expect(page.locator("#settings_note .in-call-note")).to_be_visible()  # the settings are the call's until it ends
            expect(page.locator("#live .clock")).to_contain_text(re.compile(r"^0:0\d of 10:00$"))
            page.screenshot(path=str(ARTIFACTS / "conversation.png"), full_page=True)
            button.click()  # the call ends here, and the page says so: nothing stays live
            expect(page.locator("#live .verdict")).to_have_text("ended")
            expect(page.locator("#live [data-ending='stopped']")).to_contain_text("You ended the call.")
            expect(page.locator("#live .who.speaking")).to_have_count(0)
            expect(page.locator("#details")).to_contain_text("closed; the call is ended")
            expect(page.locator("#settings_note .in-call-note")).to_be_hidden()
            link = page.locator("#recording a")
            expect(link).to_have_attribute("href", re.compile(r"call\.wav$"), timeout=10_000)
            expect(page.locator("#transcript_file a")).to_have_attribute("href", re.compile(r"transcript\.txt$"))
            recording = page.request.get(link.get_attribute("href")).body()
            with wave.open(io.BytesIO(recording)) as w:
                assert w.getnchannels() == 2 and w.getframerate() == 24000 and w.getnframes() > 24000
            transcript = page.request.get(page.locator("#transcript_file a").get_attribute("href")).text()
            assert re.match(r"\[0:0\d\] (You|Model): ", transcript) and "<s>" not in transcript
            page.wait_for_timeout(1500)  # still ended a moment later (a late update does not bring the call back)
            expect(page.locator("#live .verdict")).to_have_text("ended")
            page.screenshot(path=str(ARTIFACTS / "after-the-call.png"), full_page=True)
        finally:
            ctx.close()
            shutil.rmtree(profile, ignore_errors=True)


def test_on_a_phone_the_start_control_and_the_conversation_are_on_the_first_screen(running_app, files):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        ctx, profile = browser(p, files["mic"], PHONE)
        try:
            page = ctx.new_page()
            page.goto(running_app.url)
            expect(page.locator("#status")).to_contain_text("Ready", timeout=30_000)
            choose(page, "voice", "TESTV0")
            page.evaluate("window.scrollTo(0, 0)")
            assert in_view(page, START_TILE, PHONE, at_least_px=40) and in_view(page, "#conversation", PHONE, at_least_px=150)
            expect(page.locator("#summary")).to_contain_text("Assistant · TESTV0 (change)")  # the pickers are further down
            assert in_view(page, "#summary", PHONE, at_least_px=20)
            page.locator(START_TILE).click()  # one click: the microphone, then the call
            button = page.locator(CALL_BUTTON)
            expect(button).to_contain_text("End the call", timeout=20_000)
            expect(page.locator("#conversation [data-testid='bot']").first).to_be_visible(timeout=20_000)
            page.evaluate("window.scrollTo(0, 0)")
            assert in_view(page, CALL_BUTTON, PHONE, at_least_px=30) and in_view(page, "#conversation", PHONE, at_least_px=150)
            page.screenshot(path=str(ARTIFACTS / "conversation-phone.png"))
            button.click()
            expect(page.locator("#recording a")).to_have_attribute("href", re.compile(r"call\.wav$"), timeout=10_000)
        finally:
            ctx.close()
            shutil.rmtree(profile, ignore_errors=True)


def test_the_offline_tab_in_the_browser(running_app):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        ctx, profile = browser(p, None, {"width": 1280, "height": 1300})
        try:
            page = ctx.new_page()
            page.goto(running_app.url)
            expect(page.locator("#status")).to_contain_text("Ready", timeout=30_000)
            choose(page, "voice", "TESTV0")
            page.get_by_role("tab", name="Offline").click()
            page.locator("#offline_run").click()  # nothing given yet: a message, and no error badges on the outputs
            expect(page.get_by_text("Upload or record the user's side first")).to_be_visible(timeout=10_000)
            for output in ("offline_agent", "offline_mix", "offline_text", "offline_files"):
                expect(page.locator(f"#{output}")).not_to_contain_text("Error")
            page.locator("#offline_in input[type=file]").set_input_files(str(ROOT / "examples" / "user_question.wav"))
            page.locator("#offline_run").click()
            expect(page.locator("#offline_text textarea")).to_have_value(re.compile(r"^\[0:00\] (You|Model): "), timeout=60_000)
            for name in ("model.wav", "both.wav", "transcript.txt"):
                expect(page.locator(f"#offline_files a[href$='{name}']")).to_have_count(1)
        finally:
            ctx.close()
            shutil.rmtree(profile, ignore_errors=True)
