"""WebRTC's 48 kHz microphone down to the model's 24 kHz, packet by packet.

Implements `HalfRate`: a windowed-sinc low-pass below 12 kHz, then every other sample, with the
filter's state carried from one chunk to the next. Math only (NumPy).
"""

from __future__ import annotations

import numpy as np

from personaplex.serve.contract import SAMPLE_RATE


class HalfRate:
    """A live stream at twice 24 kHz (48 kHz, what WebRTC's Opus decodes to) down to 24 kHz,
    chunk by chunk, with no added framing: a windowed-sinc low-pass below the new Nyquist rate,
    then every other sample. The filter's state carries from one chunk to the next, so chunks
    of any size give exactly the output of the whole stream, about 0.5 ms late."""

    TAPS = 49  # odd: a whole-sample delay of 24 input samples

    def __init__(self, cutoff_hz: float = 10_800.0, rate: int = 2 * SAMPLE_RATE) -> None:
        n = np.arange(self.TAPS) - (self.TAPS - 1) / 2
        taps = np.sinc(2 * cutoff_hz / rate * n) * np.kaiser(self.TAPS, 8.0)
        self._taps = (taps / taps.sum()).astype(np.float32)
        self._history = np.zeros(self.TAPS - 1, dtype=np.float32)
        self._parity = 0  # input samples seen, modulo 2: which of the next ones is kept

    def push(self, pcm: np.ndarray) -> np.ndarray:
        """float32 [T] at 48 kHz -> float32 [about T / 2] at 24 kHz."""
        x = np.concatenate([self._history, pcm.astype(np.float32, copy=False).reshape(-1)])
        filtered = np.convolve(x, self._taps, mode="valid")  # one output per new input sample
        self._history = x[x.size - (self.TAPS - 1) :]
        out = filtered[self._parity :: 2]
        self._parity = (self._parity + pcm.size) % 2
        return out.astype(np.float32, copy=False)
