"""Figures written the moment they are measured: each a JSON line, flushed (`--rows PATH`).

A run cut short (a lease's time limit, a `timeout`) keeps every figure it had; a benchmark
writes what it started with (the engine's start and compile time, the device) first.
"""

from __future__ import annotations

import json
import time


class Rows:
    """Append figures to `path` as JSON lines `{"row": kind, "at_s": seconds since the start,
    ...figures}`; with no path, nothing is written."""

    def __init__(self, path: str | None) -> None:
        self._file = open(path, "a") if path else None  # open for the whole run, closed in `close`
        self._began = time.perf_counter()

    def emit(self, row: str, **figures: object) -> None:
        if self._file is not None:
            line = {"row": row, "at_s": round(time.perf_counter() - self._began, 2), **figures}
            self._file.write(json.dumps(line, default=str) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> Rows:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
