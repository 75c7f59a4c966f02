"""The app's API as `gradio_client` sees it (the app started as the README starts it, on the tiny
checkpoint): only what a person would call, with named parameters and the loaded checkpoint's
voices; the offline generation and the custom voice upload driven through it."""

from __future__ import annotations

import wave

import pytest

from personaplex.runtime.audio import read_audio

from .helpers import ROOT

gradio_client = pytest.importorskip("gradio_client")
PUBLIC = {"/generate_offline", "/upload_voice", "/preview_voice", "/voices", "/personas"}
SAMPLING = {"text_temperature": 0.7, "text_top_k": 25, "audio_temperature": 0.8, "audio_top_k": 250, "seed": 7, "greedy": False}


@pytest.fixture(scope="module")
def api(running_app):
    return gradio_client.Client(running_app.url, verbose=False)


def test_the_api_lists_only_named_endpoints_with_named_parameters_and_the_checkpoints_voices(api):
    info = api.view_api(return_format="dict", print_info=False)
    assert info["unnamed_endpoints"] == {} and set(info["named_endpoints"]) == PUBLIC
    for name, endpoint in info["named_endpoints"].items():
        for parameter in endpoint["parameters"]:
            assert not parameter["parameter_name"].startswith("param_"), (name, parameter)
    offline = {p["parameter_name"]: p for p in info["named_endpoints"]["/generate_offline"]["parameters"]}
    assert list(offline) == ["user_audio", "role_prompt", "voice", "consent", *SAMPLING]
    assert offline["voice"]["type"]["enum"] == ["TESTV0", "Custom voice (uploaded)"]  # not the 18 release names
    for name, endpoint in info["named_endpoints"].items():  # plain values, each with a name and a type
        for value in endpoint["returns"]:
            assert value["label"] and not value["label"][0].isdigit() and value["python_type"]["type"] != "Any", (name, value)
    types = {n: [r["python_type"]["type"] for r in e["returns"]] for n, e in info["named_endpoints"].items()}
    assert types["/voices"] == ["list[dict(name: str, label: str)]"] and types["/upload_voice"] == ["str", "filepath"]
    assert {p["parameter_name"]: p["python_type"]["type"] for p in offline.values()}["text_top_k"] == "int"
    assert api.predict(api_name="/voices") == [{"name": "TESTV0", "label": "TESTV0"}]
    assert any(p["name"] == "Assistant" and p["prompt"] for p in api.predict(api_name="/personas"))


def test_offline_generation_through_the_api(api):
    user = ROOT / "examples" / "user_question.wav"
    agent, mix, text, files = api.predict(gradio_client.handle_file(str(user)), "You enjoy having a good conversation.",
                                          "TESTV0", False, *SAMPLING.values(), api_name="/generate_offline")
    assert read_audio(agent).size == read_audio(user).size
    with wave.open(mix) as w:
        assert w.getnchannels() == 2
    assert text.startswith("[0:00] ") and "<s>" not in text and len(files) == 3


def test_a_custom_voice_uploaded_through_the_api_is_used_by_the_same_client(api, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio" * 100)
    message, *_ = api.predict(gradio_client.handle_file(str(bad)), True, api_name="/upload_voice")
    assert "bad.wav" in message and ("not an audio file" in message or "could not be decoded" in message)
    voice = ROOT / "examples" / "voice_sample.wav"
    message, *_ = api.predict(gradio_client.handle_file(str(voice)), False, api_name="/upload_voice")
    assert "Tick the consent box" in message
    message, heard = api.predict(gradio_client.handle_file(str(voice)), True, api_name="/upload_voice")
    assert "Custom voice ready (8.6 s)" in message and read_audio(heard).size == read_audio(voice).size
    user = ROOT / "examples" / "user_question.wav"
    agent, *_ = api.predict(gradio_client.handle_file(str(user)), "", "Custom voice (uploaded)", True, *SAMPLING.values(),
                            api_name="/generate_offline")
    assert read_audio(agent).size == read_audio(user).size
    other = gradio_client.Client(api.src, verbose=False)  # another session has no custom voice
    with pytest.raises(Exception, match="upload or record a custom voice"):
        other.predict(gradio_client.handle_file(str(user)), "", "Custom voice (uploaded)", True, *SAMPLING.values(),
                      api_name="/generate_offline")


def test_a_voice_preview_through_the_api_is_the_audio_file(api):
    preview = api.predict("TESTV0", api_name="/preview_voice")
    assert isinstance(preview, str) and read_audio(preview).size == 4 * 24000  # a file, not a component update
