"""Audio files in any common format, loudness, framing; clear errors for bad files."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from personaplex.runtime.audio import (
    AudioError,
    FrameBuffer,
    float_to_int16,
    int16_to_float,
    normalize_loudness,
    read_audio,
    write_wav,
)

from .helpers import TINY_DIR, encode_audio_file, tone


@pytest.mark.parametrize(
    "name,codec,rate,channels",
    [
        ("a.wav", "pcm_s16le", 24000, 1),
        ("b.wav", "pcm_s16le", 44100, 2),
        ("c.flac", "flac", 48000, 2),
        ("d.mp3", "libmp3lame", 44100, 2),
        ("e.ogg", "libopus", 48000, 1),
        ("f.wav", "pcm_f32le", 16000, 1),
    ],
)
def test_any_common_format_and_rate_becomes_24khz_mono(tmp_path, name, codec, rate, channels):
    path = encode_audio_file(tmp_path / name, tone(1.5, rate, channels=channels), rate, codec)
    pcm = read_audio(path)
    assert pcm.dtype == np.float32 and pcm.ndim == 1
    assert abs(pcm.size - 1.5 * 24000) < 0.05 * 24000  # codecs may add a little padding
    spectrum = np.abs(np.fft.rfft(pcm[2400:-2400]))
    assert abs(np.argmax(spectrum) * 24000 / (pcm.size - 4800) - 440) < 5
    assert 0.2 < np.abs(pcm).max() < 0.4


def test_stereo_is_mixed_down(tmp_path):
    left, right = tone(1.0, 24000)[0], tone(1.0, 24000, freq=880)[0]
    path = encode_audio_file(tmp_path / "s.wav", np.stack([left, right]), 24000, "pcm_f32le")
    np.testing.assert_allclose(read_audio(path), (left + right) / 2, atol=1e-6)


def test_int16_wav_reads_as_the_reference_does():
    pcm = read_audio(TINY_DIR / "user.wav")
    assert pcm.shape == (76800,) and np.all(np.abs(pcm) <= 1)


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "could not be decoded"),
        (b"this is not audio at all" * 100, "could not be decoded|is not an audio file"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00\xc0\x5d\x00\x00", "could not be decoded|no audio samples"),
    ],
    ids=["empty-file", "text-file", "truncated-wav"],
)
def test_bad_files_get_a_clear_error(tmp_path, content, message):
    path = tmp_path / "upload.wav"
    path.write_bytes(content)
    with pytest.raises(AudioError, match=message):
        read_audio(path)


def test_header_only_wav_has_no_samples(tmp_path):
    path = tmp_path / "empty.wav"
    write_wav(path, np.zeros(0, dtype=np.float32))
    with pytest.raises(AudioError, match=r"no audio samples|could not be decoded"):
        read_audio(path)


def test_missing_file_and_too_long(tmp_path):
    with pytest.raises(AudioError, match="not found"):
        read_audio(tmp_path / "nope.wav")
    path = encode_audio_file(tmp_path / "long.wav", tone(3.0, 24000), 24000, "pcm_s16le")
    with pytest.raises(AudioError, match="longer than 2 s"):
        read_audio(path, max_seconds=2)


def test_loudness_normalisation_reaches_minus_24_lufs():
    import pyloudnorm

    pcm = normalize_loudness(tone(2.0, 24000, amplitude=0.05)[0])
    assert abs(pyloudnorm.Meter(24000).integrated_loudness(pcm) - (-24.0)) < 0.01


def test_silent_or_tiny_clips_cannot_be_normalised():
    with pytest.raises(AudioError, match="silent"):
        normalize_loudness(np.zeros(24000, dtype=np.float32))
    with pytest.raises(AudioError, match="too short"):
        normalize_loudness(tone(0.2, 24000)[0])


def test_frame_buffer_rechunks_40_ms_into_80_ms():
    buffer = FrameBuffer()
    chunks = [np.full(960, i, dtype=np.float32) for i in range(5)]
    frames = [f for c in chunks for f in buffer.push(c)]
    assert len(frames) == 2 and all(f.shape == (1920,) for f in frames)
    assert frames[1][0] == 2 and frames[1][-1] == 3


def test_int16_round_trip_and_wav_clipping(tmp_path):
    x = np.array([0.0, 0.5, -0.5, 1.3, -1.3], dtype=np.float32)
    assert np.array_equal(float_to_int16(x), [0, 16384, -16384, 32767, -32768])
    np.testing.assert_allclose(int16_to_float(float_to_int16(x[:3])), x[:3])
    write_wav(tmp_path / "o.wav", x)
    np.testing.assert_allclose(read_audio(tmp_path / "o.wav"), np.clip(x, -1, 32767 / 32768), atol=1e-4)


def test_half_rate_is_the_same_in_any_chunks_and_keeps_speech_but_not_what_would_alias():
    from web.half_rate import HalfRate

    noise = np.random.default_rng(0).standard_normal(48_000).astype(np.float32)
    whole = HalfRate().push(noise)
    half = HalfRate()
    cuts = [0, 960, 967, 1920, 30_001, 48_000]  # packets, and odd sizes
    chunked = np.concatenate([half.push(noise[a:b]) for a, b in itertools.pairwise(cuts)])
    assert whole.size == 24_000 and np.array_equal(chunked, whole)
    t = np.arange(48_000) / 48_000

    def gain_db(hz: float) -> float:
        out = HalfRate().push(np.sin(2 * np.pi * hz * t).astype(np.float32))[500:]
        return 20 * np.log10(np.sqrt(np.mean(out**2)) / np.sqrt(0.5))

    assert abs(gain_db(1000)) < 0.01 and abs(gain_db(8000)) < 0.01  # speech passes unchanged
    assert gain_db(13_000) < -45 and gain_db(18_000) < -80  # above 12 kHz it would fold back: removed
