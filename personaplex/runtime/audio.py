"""Audio I/O and framing: files in any common format, loudness, int16 <-> float, 80 ms frames.

Implements:
  * `read_audio(path)`: wav, flac, mp3, ogg, webm, ... at any rate -> mono float32 at 24 kHz
    (channels are averaged; decoding by FFmpeg through PyAV, resampling by soxr);
  * `normalize_loudness(pcm)`: a pure gain to -24 LUFS (ITU BS.1770 via pyloudnorm), as the
    reference does for voice prompts;
  * `write_wav`, `wav_bytes`, `int16_to_float`, `float_to_int16`;
  * `frames_of`: a clip as whole 80 ms frames;
  * `FrameBuffer`: chunks of any size in, whole 1920-sample frames out;
  * `level_db`: a frame's loudness in dBFS, and the levels that count as speech and as silence.
Every failure is an `AudioError` whose message says what is wrong with the file.

PyAV, soxr and pyloudnorm are imported where a file is read, resampled or measured (`codecs`),
not with the package: the engine, its benchmarks and the GPU tests run without them. A server
imports them once while its model loads (`preload`): pyloudnorm brings SciPy, which holds the
interpreter for about a second, and the first upload should not wait for that.
"""

from __future__ import annotations

import io
import warnings
import wave
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import UserError
from ..model.config import FRAME_SIZE, SAMPLE_RATE, VOICE_PROMPT_LUFS

SPEECH_DB = -45.0  # louder frames count as speech (after the browser's noise suppression)
SILENT_DB = -120.0
_INT16_SCALE = 32768.0
_LOUDNESS_BLOCK_S = 0.4  # BS.1770 gating block: shorter clips have no loudness


class AudioError(UserError):
    """Audio that cannot be used, with a message meant for the person who supplied it."""


def codecs() -> tuple[ModuleType, ModuleType, ModuleType]:
    """(av, soxr, pyloudnorm), imported on first use."""
    import av
    import pyloudnorm
    import soxr

    return av, soxr, pyloudnorm


def preload() -> None:
    """Import the codec libraries now (a server's loader thread), not at the first upload."""
    codecs()


def _to_float(frame: Any) -> np.ndarray:
    """One decoded frame -> float32 [channels, samples] in [-1, 1]."""
    data = frame.to_ndarray()
    fmt = frame.format
    channels = len(frame.layout.channels)
    if not fmt.is_planar:
        data = data.reshape(-1, channels).T
    if data.dtype == np.int16:
        return data.astype(np.float32) / _INT16_SCALE
    if data.dtype == np.int32:
        return (data.astype(np.float64) / 2.0**31).astype(np.float32)
    if data.dtype == np.uint8:
        return (data.astype(np.float32) - 128.0) / 128.0
    return data.astype(np.float32)


def read_audio(path: str | Path, max_seconds: float | None = None) -> np.ndarray:
    """Decode a file to mono float32 at 24 kHz. Raises `AudioError` on anything unusable."""
    name = Path(path).name
    av, _, _ = codecs()
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise AudioError(f"{name} is not an audio file: it has no audio track")
            stream = container.streams.audio[0]
            rate = stream.codec_context.sample_rate or stream.rate
            chunks = []
            total = 0
            for frame in container.decode(stream):
                chunk = _to_float(frame)
                chunks.append(chunk.mean(axis=0))
                total += chunk.shape[1]
                if max_seconds is not None and rate and total > max_seconds * rate * 1.01 + FRAME_SIZE:
                    raise AudioError(f"{name} is longer than {max_seconds:g} s")
    except AudioError:
        raise
    except FileNotFoundError as exc:
        raise AudioError(f"{name}: file not found") from exc
    except (av.FFmpegError, ValueError, OSError, IndexError) as exc:
        raise AudioError(f"{name} could not be decoded: it is not an audio file, or it is damaged") from exc
    if total == 0 or not rate:
        raise AudioError(f"{name} contains no audio samples")
    pcm = np.concatenate(chunks)
    if not np.all(np.isfinite(pcm)):
        raise AudioError(f"{name} contains invalid (non-finite) samples")
    return resample(pcm, rate, SAMPLE_RATE)


def resample(pcm: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    if rate == target:
        return pcm.astype(np.float32, copy=False)
    _, soxr, _ = codecs()
    return soxr.resample(pcm, rate, target, quality="HQ").astype(np.float32)


def normalize_loudness(pcm: np.ndarray, target_lufs: float = VOICE_PROMPT_LUFS) -> np.ndarray:
    """Apply the gain that brings the clip's integrated loudness to `target_lufs`."""
    if pcm.shape[0] < _LOUDNESS_BLOCK_S * SAMPLE_RATE:
        raise AudioError(f"the clip is too short to measure its loudness (at least {_LOUDNESS_BLOCK_S} s)")
    _, _, pyloudnorm = codecs()
    loudness = pyloudnorm.Meter(SAMPLE_RATE).integrated_loudness(pcm)
    if not np.isfinite(loudness):
        raise AudioError("the clip is silent")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyloudnorm warns when the gain clips; so does the reference
        return pyloudnorm.normalize.loudness(pcm, loudness, target_lufs).astype(np.float32)


def level_db(pcm: np.ndarray) -> float:
    """Loudness of float32 samples in [-1, 1], in dBFS; `SILENT_DB` for digital silence."""
    power = float(np.mean(np.square(pcm, dtype=np.float64))) if pcm.size else 0.0
    return max(SILENT_DB, 10 * np.log10(power)) if power > 0 else SILENT_DB


def int16_to_float(pcm: np.ndarray) -> np.ndarray:
    return pcm.astype(np.float32) / _INT16_SCALE


def float_to_int16(pcm: np.ndarray) -> np.ndarray:
    return np.clip(np.round(pcm * _INT16_SCALE), -32768, 32767).astype(np.int16)


def wav_bytes(pcm: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """16-bit PCM wav of pcm [T] (mono) or [T, C]; values past full scale are clipped."""
    data = float_to_int16(pcm)
    channels = 1 if data.ndim == 1 else data.shape[1]
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(data.tobytes())
    return buffer.getvalue()


def write_wav(path: str | Path, pcm: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    Path(path).write_bytes(wav_bytes(pcm, rate))


def frames_of(pcm: np.ndarray) -> np.ndarray:
    """float32 [T] -> [F, 1920] 80 ms frames, the last one zero-padded; an empty clip is refused."""
    if pcm.size == 0:
        raise AudioError("the recording is empty")
    frames = np.zeros((-(-pcm.size // FRAME_SIZE), FRAME_SIZE), dtype=np.float32)
    frames.reshape(-1)[: pcm.size] = pcm
    return frames


class FrameBuffer:
    """Collects samples of any chunk size and hands out whole 1920-sample frames."""

    def __init__(self, frame_size: int = FRAME_SIZE) -> None:
        self.frame_size = frame_size
        self._pending = np.zeros(0, dtype=np.float32)

    def push(self, pcm: np.ndarray) -> list[np.ndarray]:
        """Add float32 samples [T]; return every frame [1920] now complete, oldest first."""
        self._pending = np.concatenate([self._pending, pcm.astype(np.float32, copy=False).reshape(-1)])
        n = self._pending.shape[0] // self.frame_size
        frames = [self._pending[i * self.frame_size : (i + 1) * self.frame_size] for i in range(n)]
        self._pending = self._pending[n * self.frame_size :].copy()
        return frames

    @property
    def pending(self) -> int:
        """Samples waiting for the rest of their frame."""
        return self._pending.shape[0]
