"""Paths of the fixtures and small helpers shared by the tests."""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
TINY_DIR = FIXTURES / "tiny"
CHECKPOINT = TINY_DIR / "checkpoint"
TINY_CONFIG = CHECKPOINT / "tiny_config.json"
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
