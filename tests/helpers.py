"""Paths of the fixtures and small helpers shared by the tests."""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
TINY_DIR = FIXTURES / "tiny"
CHECKPOINT = TINY_DIR / "checkpoint"
TINY_CONFIG = CHECKPOINT / "tiny_config.json"
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def encode_audio_file(path: Path, pcm, rate: int, codec: str) -> Path:
    """Write float32 pcm [channels, samples] with FFmpeg (through PyAV) in the given codec."""
    import av
    import numpy as np

    layout = "mono" if pcm.shape[0] == 1 else "stereo"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        fmt = stream.codec_context.format.name
        frame_size = stream.codec_context.frame_size or 1024
        for start in range(0, pcm.shape[1], frame_size):
            chunk = np.ascontiguousarray(pcm[:, start : start + frame_size], dtype=np.float32)
            if fmt == "s16":
                data = (np.clip(chunk, -1, 1) * 32767).astype(np.int16).T.reshape(1, -1)
            elif fmt == "fltp":
                data = chunk
            elif fmt == "flt":
                data = chunk.T.reshape(1, -1)
            elif fmt == "s32p":
                data = (np.clip(chunk, -1, 1) * (2**31 - 1)).astype(np.int32)
            else:
                raise ValueError(fmt)
            frame = av.AudioFrame.from_ndarray(data, format=fmt, layout=layout)
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1, amplitude: float = 0.3):
    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    wave = (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([wave] * channels)
