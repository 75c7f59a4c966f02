"""PersonaPlex-7B in PyTorch: the release weights, streaming Mimi + LM, a batched engine.

The public API; each name lives in the module named in the comment.
"""

from .config import PERSONAPLEX_7B, PRESETS, TINY, ModelConfig, load_config  # config
from .engine import Engine, Frame  # engine
from .errors import SettingsError, UserError  # errors
from .loading import CheckpointError, Models, load_models, resolve_checkpoint  # loading
from .persona import PromptError, VoicePrompt  # persona
from .sampling import SamplingParams  # sampling
from .session import OFFLINE, REALTIME, Ending, Limits, Output, Session  # session
from .worker import Busy, EngineWorker  # worker

__all__ = [
    "OFFLINE",
    "PERSONAPLEX_7B",
    "PRESETS",
    "REALTIME",
    "TINY",
    "Busy",
    "CheckpointError",
    "Ending",
    "Engine",
    "EngineWorker",
    "Frame",
    "Limits",
    "ModelConfig",
    "Models",
    "Output",
    "PromptError",
    "SamplingParams",
    "Session",
    "SettingsError",
    "UserError",
    "VoicePrompt",
    "load_config",
    "load_models",
    "resolve_checkpoint",
]
