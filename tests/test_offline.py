"""The offline CLI on the tiny golden checkpoint: reference outputs, lengths, bad inputs."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch

from personaplex.runtime.audio import read_audio, write_wav
from personaplex.serve.offline import main

from .helpers import CHECKPOINT, SHARED, TINY_CONFIG, TINY_DIR, encode_audio_file, tone

GOLDEN_ARGS = ["--checkpoint", str(CHECKPOINT), "--config", str(TINY_CONFIG), "--greedy", "--dtype", "float32", "--device", "cpu"]


def run_cli(tmp_path, *extra: str, input_wav=None) -> tuple[int, np.ndarray | None, list | None]:
    out_wav, out_json = tmp_path / "out.wav", tmp_path / "out.json"
    argv = ["--input-wav", str(input_wav or TINY_DIR / "user.wav"), "--output-wav", str(out_wav), "--output-text", str(out_json)]
    rc = main(argv + list(extra))
    if rc != 0:
        return rc, None, None
    return rc, read_audio(out_wav), json.loads(out_json.read_text())


def golden_labels(expected, key):
    labels = []
    for t in expected[f"{key}_tokens"][0].tolist():
        labels.append({0: "EPAD", 3: "PAD"}.get(t))
    return labels


@pytest.mark.parametrize(
    "voice,key",
    [("TESTV0", "session_pt"), ("TESTV0.pt", "session_pt"), (str(CHECKPOINT / "voices" / "TESTV0.wav"), "session")],
    ids=["voice-name", "reference-style-name", "wav-path"],
)
def test_cli_reproduces_the_golden_session(tmp_path, expected, expected_json, voice, key):
    rc, pcm, labels = run_cli(tmp_path, "--voice-prompt", voice, *GOLDEN_ARGS)
    assert rc == 0
    assert pcm.shape == (76800,)
    golden = np.clip(expected[f"{key}_pcm"].numpy(), -1.0, 32767 / 32768)
    np.testing.assert_allclose(pcm, golden, atol=1e-3)
    assert len(labels) == 40 and labels[0] == "PAD"
    padding = golden_labels(expected, key)
    assert [lab for lab, pad in zip(labels, padding) if pad] == [p for p in padding if p]
    assert [lab for lab in labels if lab not in ("PAD", "EPAD")] == expected_json["session_text_pieces"]


def test_keep_persona_gives_the_golden_session_before_the_window_fills(tmp_path, expected):
    _rc, plain, plain_labels = run_cli(tmp_path, "--voice-prompt", "TESTV0", *GOLDEN_ARGS)
    rc, pcm, labels = run_cli(tmp_path, "--voice-prompt", "TESTV0", "--keep-persona", *GOLDEN_ARGS)
    assert rc == 0 and labels == plain_labels
    np.testing.assert_allclose(pcm, plain, atol=1e-3)


def test_output_is_exactly_as_long_as_the_input_and_role_may_be_empty(tmp_path):
    src = tmp_path / "odd.wav"
    write_wav(src, tone(49199 / 24000, 24000)[0])
    rc, pcm, labels = run_cli(tmp_path, "--voice-prompt", "TESTV0", "--text-prompt", "", *GOLDEN_ARGS, input_wav=src)
    assert rc == 0 and pcm.shape == (49199,) and len(labels) == 26


def test_8_bit_weights_and_cache_give_a_whole_reply(tmp_path):
    """(How close it is to full precision is `benchmarks.quality`'s measure: free-running greedy
    output of a random tiny model parts from it within frames, whatever the format.)"""
    rc, pcm, labels = run_cli(tmp_path, "--voice-prompt", "TESTV0", *GOLDEN_ARGS, "--weights", "int8", "--kv-cache", "fp8")
    assert rc == 0 and pcm.shape == (76800,) and len(labels) == 40 and np.abs(pcm).max() > 0.01


def test_other_formats_rates_and_sampling(tmp_path):
    src = encode_audio_file(tmp_path / "in.flac", tone(1.0, 48000, channels=2), 48000, "flac")
    args = [a for a in GOLDEN_ARGS if a != "--greedy"]
    rc, pcm, labels = run_cli(tmp_path, "--voice-prompt", "TESTV0", "--seed", "7", *args, input_wav=src)
    assert rc == 0 and pcm.shape == (24000,) and len(labels) == 13
    _rc2, pcm2, labels2 = run_cli(tmp_path, "--voice-prompt", "TESTV0", "--seed", "7", *args, input_wav=src)
    assert labels2 == labels and np.array_equal(pcm2, pcm)


def corrupt_input(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"definitely not audio" * 50)
    return bad


def empty_input(tmp_path):
    empty = tmp_path / "empty.wav"
    write_wav(empty, np.zeros(0, dtype=np.float32))
    return empty


def small_context_config(tmp_path):
    raw = json.loads(TINY_CONFIG.read_text())
    raw["lm"]["context"] = 60
    path = tmp_path / "small.json"
    path.write_text(json.dumps(raw))
    return path


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (lambda p: {"--input-wav": corrupt_input(p)}, "bad.wav could not be decoded"),
        (lambda p: {"--input-wav": empty_input(p)}, "empty.wav (contains no audio samples|could not be decoded)"),
        (lambda p: {"--voice-prompt": "NATF9"}, r"unknown voice prompt 'NATF9': no such voice \(available: TESTV0\)"),
        (lambda p: {"--voice-prompt": corrupt_input(p)}, "bad.wav could not be decoded"),
        (lambda p: {"--checkpoint": p}, "missing model.safetensors: looked for"),
        (lambda p: {"--config": small_context_config(p)}, "role text is 68 tokens; with this voice at most 27 fit"),
        (lambda p: {"--topk-audio": 0}, "topk_audio must be a whole number from 1 to 500"),
        pytest.param(lambda p: {"--device": "cuda"}, "no CUDA GPU is available", marks=NO_CUDA),
    ],
    ids=["corrupt-input", "empty-input", "unknown-voice", "corrupt-voice", "missing-checkpoint", "role-too-long",
         "bad-top-k", "no-cuda"],
)
def test_bad_inputs_give_a_clear_message(tmp_path, caplog, overrides, message):
    args = {"--input-wav": TINY_DIR / "user.wav", "--voice-prompt": "TESTV0", "--checkpoint": CHECKPOINT,
            "--config": TINY_CONFIG, "--dtype": "float32", "--device": "cpu"}
    args.update(overrides(tmp_path))
    out_wav = tmp_path / "out.wav"
    argv = ["--output-wav", str(out_wav), "--output-text", str(tmp_path / "out.json"), "--greedy"]
    argv += [str(item) for pair in args.items() for item in pair]
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    assert re.search(message, caplog.text), caplog.text
    assert not out_wav.exists()


def test_wrong_shape_checkpoint_names_the_tensor(tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    from .helpers import copy_checkpoint

    folder = copy_checkpoint(tmp_path / "ckpt")
    state = load_file(str(folder / "model.safetensors"))
    state["emb.3.weight"] = torch.zeros(2049, 16, dtype=torch.bfloat16)
    save_file(state, str(folder / "model.safetensors"))
    with caplog.at_level(logging.ERROR):
        rc, _, _ = run_cli(tmp_path, "--voice-prompt", "TESTV0", *[a if a != str(CHECKPOINT) else str(folder) for a in GOLDEN_ARGS])
    assert rc == 2 and "emb.3.weight has shape [2049, 16] but the model expects [2049, 32]" in caplog.text


REFERENCE_AUDIO = SHARED / "reference-audio"


@pytest.mark.skipif(not (REFERENCE_AUDIO / "input_service.wav").exists(), reason="needs ../shared/reference-audio")
def test_a_real_20_s_recording_with_its_service_prompt(tmp_path):
    """A real customer-service call (the reference's test asset) through the CLI: past Mimi's
    10 s attention window, with the role prompt it was recorded for."""
    role = (REFERENCE_AUDIO / "prompt_service.txt").read_text().strip()
    rc, pcm, labels = run_cli(tmp_path, "--voice-prompt", "TESTV0", "--text-prompt", role, *GOLDEN_ARGS,
                              input_wav=REFERENCE_AUDIO / "input_service.wav")
    n = read_audio(REFERENCE_AUDIO / "input_service.wav").size
    assert rc == 0 and pcm.shape == (n,) and len(labels) == -(-n // 1920)
    assert np.isfinite(pcm).all() and np.abs(pcm).max() > 0.01
