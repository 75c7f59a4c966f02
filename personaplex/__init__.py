"""PersonaPlex-7B in PyTorch: the release weights, streaming Mimi + LM, a batched engine.

The public API; each name lives in the module named in the comment.
"""

from .config import PERSONAPLEX_7B, PRESETS, TINY, ModelConfig, load_config  # config
from .engine import Engine, Frame  # engine
from .loading import CheckpointError, Models, load_models, resolve_checkpoint  # loading
from .persona import PromptError, VoicePrompt  # persona
from .sampling import SamplingParams  # sampling
from .worker import Busy, EngineWorker, Session  # worker

__all__ = [
    "PERSONAPLEX_7B",
    "PRESETS",
    "TINY",
    "Busy",
    "CheckpointError",
    "Engine",
    "EngineWorker",
    "Frame",
    "ModelConfig",
    "Models",
    "PromptError",
    "SamplingParams",
    "Session",
    "VoicePrompt",
    "load_config",
    "load_models",
    "resolve_checkpoint",
]
