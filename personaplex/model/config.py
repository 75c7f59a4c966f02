"""Configuration: frozen dataclasses for Mimi and the LM, the release presets, named constants.

Implements:
  * audio and token-id constants (`SAMPLE_RATE`, `FRAME_SIZE`, `TEXT_PAD_ID`, ...),
  * `SEANetConfig`, `MimiTransformerConfig`, `QuantizerConfig`, `MimiConfig`, `LMConfig`,
    `ModelConfig`, with the PersonaPlex-7B release as the default values,
  * `TINY`: the structure of the golden test checkpoint (random weights, release format),
  * `config_from_reference_dict` / `load_config`: the reference's JSON hyper-parameter names.

Everything that the release fixes and that this implementation does not make configurable
(SiLU gating, RMSNorm in float32, interleaved RoPE, per-step depformer weights, ...) is checked
by the JSON loader, which refuses any other value with a message naming the key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SettingsError, UserError

# --- audio -------------------------------------------------------------------------------
# One frame is one LM step: every length in frames, ticks and calls is counted in these.
SAMPLE_RATE = 24_000
FRAME_SIZE = 1920  # samples per 80 ms frame
FRAME_RATE = SAMPLE_RATE / FRAME_SIZE  # 12.5 frames a second
FRAME_S = FRAME_SIZE / SAMPLE_RATE  # 0.08 s a frame
CODES_PER_STREAM = 8  # Mimi codebooks used per speaker (1 semantic + 7 acoustic)

# --- token ids ---------------------------------------------------------------------------
TEXT_EPAD_ID = 0  # end of padding: the model marks the step before a word
TEXT_PAD_ID = 3  # padding: "nothing said"; also the forced text during audio prompts
UNGENERATED_ID = -2  # fill value of the delay ring; never fed to the model

# Mimi codes (codebooks 0..7) of one frame of silence and of the 440 Hz "user is silent"
# sine. The reference hard-codes them instead of encoding audio, and so do we.
SILENCE_TOKENS = (948, 243, 1178, 546, 1736, 1030, 1978, 2008)
SINE_TOKENS = (430, 1268, 381, 1611, 1095, 1495, 56, 472)

# --- persona prompt ----------------------------------------------------------------------
PROMPT_SILENCE_FRAMES = 6  # int(0.5 s * 12.5 Hz), after the voice and after the text
VOICE_PROMPT_LUFS = -24.0
DEFAULT_TEXT_PROMPT = (
    "You are a wise and friendly teacher. "
    "Answer questions or provide advice in a clear and engaging way."
)


# --- formats -------------------------------------------------------------------------------
WEIGHT_FORMATS = ("bf16", "int8", "fp8")  # the LM's weights (`formats`): as loaded, or in 8 bits
KV_FORMATS = ("bf16", "fp8")  # the LM's KV cache (`kv_cache`): the model's own dtype, or float8

# --- sampling ------------------------------------------------------------------------------
# Largest top-k: sampling looks at this many candidates, whatever each slot's own k (a static
# shape, cheaper than sorting the vocabulary, and fixed for CUDA graphs).
MAX_TOP_K = {"text": 100, "audio": 500}


MAX_TEMPERATURE = 10.0
SEED_MAX = 2**32 - 1  # the noise hash reads 32 bits of the seed: larger seeds would repeat smaller ones


def random_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


@dataclass(frozen=True)
class SamplingParams:
    """Per-conversation decoding settings; the defaults are the reference's. Out-of-range or
    wrongly typed values raise `SettingsError` (they may come from a client). A top-k of 0
    ("no limit" in the reference) is not offered: at most `MAX_TOP_K` candidates."""

    temp_text: float = 0.7
    topk_text: int = 25
    temp_audio: float = 0.8
    topk_audio: int = 250
    greedy: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("temp_text", "temp_audio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= MAX_TEMPERATURE:
                raise SettingsError(f"{name} must be a number from 0 to {MAX_TEMPERATURE:g}, got {value!r}")
        for name, kind in (("topk_text", "text"), ("topk_audio", "audio")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOP_K[kind]:
                raise SettingsError(f"{name} must be a whole number from 1 to {MAX_TOP_K[kind]}, got {value!r}")
        if not isinstance(self.greedy, bool):
            raise SettingsError(f"greedy must be true or false, got {self.greedy!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= SEED_MAX:
            raise SettingsError(f"the seed must be a whole number from 0 to {SEED_MAX}, got {self.seed!r}")

    @property
    def text_temperature(self) -> float:
        return 0.0 if self.greedy else self.temp_text

    @property
    def audio_temperature(self) -> float:
        return 0.0 if self.greedy else self.temp_audio


@dataclass(frozen=True)
class SEANetConfig:
    channels: int = 1
    dimension: int = 512
    n_filters: int = 64
    n_residual_layers: int = 1
    ratios: tuple[int, ...] = (8, 6, 5, 4)  # decoder order; the encoder uses them reversed
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    compress: int = 2

    @property
    def hop_length(self) -> int:
        hop = 1
        for r in self.ratios:
            hop *= r
        return hop


@dataclass(frozen=True)
class MimiTransformerConfig:
    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 8
    dim_feedforward: int = 2048
    context: int = 250  # in 25 Hz encoder steps: 10 s
    max_period: float = 10_000.0


@dataclass(frozen=True)
class QuantizerConfig:
    dimension: int = 256
    n_q: int = 32
    bins: int = 2048
    n_q_semantic: int = 1


@dataclass(frozen=True)
class MimiConfig:
    seanet: SEANetConfig = field(default_factory=SEANetConfig)
    transformer: MimiTransformerConfig = field(default_factory=MimiTransformerConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    num_codebooks: int = CODES_PER_STREAM

    @property
    def encoder_frame_rate(self) -> float:
        return SAMPLE_RATE / self.seanet.hop_length

    @property
    def downsample_stride(self) -> int:
        return round(self.encoder_frame_rate / FRAME_RATE)


@dataclass(frozen=True)
class LMConfig:
    dim: int = 4096
    num_heads: int = 32
    num_layers: int = 32
    hidden_scale: float = 4.125
    context: int = 3000  # in 80 ms steps: 4 minutes
    max_period: float = 10_000.0
    n_q: int = 16  # audio streams: 8 agent + 8 user
    dep_q: int = 16  # depformer steps in the checkpoint (the reference forces 16)
    card: int = 2048
    text_card: int = 32_000
    delays: tuple[int, ...] = (0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1)
    depformer_dim: int = 1024
    depformer_num_heads: int = 16
    depformer_num_layers: int = 6
    depformer_dim_feedforward: int = 4224  # int(4.125 * 1024)

    @property
    def num_streams(self) -> int:
        """Rows of the token grid: text, agent audio, user audio."""
        return 1 + self.n_q

    @property
    def hidden(self) -> int:
        return gated_hidden(self.dim, int(self.hidden_scale * self.dim))

    @property
    def depformer_hidden(self) -> int:
        return gated_hidden(self.depformer_dim, self.depformer_dim_feedforward)


def gated_hidden(dim: int, dim_feedforward: int) -> int:
    """Hidden width of the gated MLP, exactly as the checkpoint was trained."""
    if dim_feedforward == 4 * dim:
        return (21 * dim) // 8
    return (2 * dim_feedforward) // 3


@dataclass(frozen=True)
class ModelConfig:
    mimi: MimiConfig = field(default_factory=MimiConfig)
    lm: LMConfig = field(default_factory=LMConfig)


PERSONAPLEX_7B = ModelConfig()

# The golden test checkpoint: the release structure with tiny widths and 2 layers.
TINY = ModelConfig(
    mimi=MimiConfig(
        seanet=SEANetConfig(dimension=32, n_filters=4),
        transformer=MimiTransformerConfig(d_model=32, num_heads=2, num_layers=2, dim_feedforward=64),
        quantizer=QuantizerConfig(dimension=16),
    ),
    lm=LMConfig(
        dim=32,
        num_heads=2,
        num_layers=2,
        text_card=120,
        depformer_dim=16,
        depformer_num_heads=2,
        depformer_num_layers=2,
        depformer_dim_feedforward=66,
    ),
)

PRESETS = {"7b": PERSONAPLEX_7B, "tiny": TINY}


class ConfigError(UserError):
    """A configuration file that this implementation cannot run."""


# Values the release fixes; a JSON config must agree with them (reference key -> value).
_FIXED_SEANET = {
    "channels": 1, "causal": True, "activation": "ELU", "dilation_base": 2,
    "disable_norm_outer_blocks": 0, "norm": "none", "pad_mode": "constant", "true_skip": True,
}
_FIXED_MIMI_TRANSFORMER = {
    "causal": True, "conv_layout": True, "gating": "none", "norm": "layer_norm",
    "positional_embedding": "rope",
}
_FIXED_LM = {
    "existing_text_padding_id": TEXT_PAD_ID, "causal": True, "layer_scale": None,
    "gating": "silu", "norm": "rms_norm_f32", "positional_embedding": "rope",
    "depformer_causal": True, "depformer_layer_scale": None, "depformer_multi_linear": True,
    "depformer_gating": "silu", "depformer_pos_emb": "none", "depformer_weights_per_step": True,
}


def _check_fixed(section: str, values: dict[str, Any], fixed: dict[str, Any]) -> None:
    for key, expected in fixed.items():
        if key in values and values[key] != expected:
            raise ConfigError(
                f"config {section}.{key} = {values[key]!r} is not supported "
                f"(PersonaPlex uses {expected!r})"
            )


def _pick(section: str, values: dict[str, Any], key: str) -> Any:
    if key not in values:
        raise ConfigError(f"config is missing {section}.{key}")
    return values[key]


def config_from_reference_dict(raw: dict[str, Any]) -> ModelConfig:
    """Build a `ModelConfig` from the reference's hyper-parameter names.

    The format is `{"mimi": {"seanet": {...}, "quantizer": {...}, "transformer": {...}}, "lm": {...}}`
    with the keys of the reference's `_seanet_kwargs`, `_quantizer_kwargs`,
    `_transformer_kwargs` and `_lm_kwargs`.
    """
    try:
        mimi, lm = raw["mimi"], raw["lm"]
        seanet, quant, trans = mimi["seanet"], mimi["quantizer"], mimi["transformer"]
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"config needs mimi.seanet, mimi.quantizer, mimi.transformer and lm: missing {exc}") from exc
    _check_fixed("mimi.seanet", seanet, _FIXED_SEANET)
    _check_fixed("mimi.transformer", trans, _FIXED_MIMI_TRANSFORMER)
    _check_fixed("lm", lm, _FIXED_LM)
    dim = _pick("mimi.seanet", seanet, "dimension")
    for section, values, key in (
        ("mimi.quantizer", quant, "input_dimension"),
        ("mimi.quantizer", quant, "output_dimension"),
        ("mimi.transformer", trans, "d_model"),
        ("mimi.transformer", trans, "input_dimension"),
    ):
        if values.get(key, dim) != dim:
            raise ConfigError(f"config {section}.{key} must equal mimi.seanet.dimension ({dim})")
    if list(trans.get("output_dimensions", [dim])) != [dim]:
        raise ConfigError(f"config mimi.transformer.output_dimensions must be [{dim}]")
    # `depformer_context` is read by neither the reference nor us: the depformer's attention
    # spans the steps of one frame.
    mimi_cfg = MimiConfig(
        seanet=SEANetConfig(
            dimension=dim,
            n_filters=_pick("mimi.seanet", seanet, "n_filters"),
            n_residual_layers=seanet.get("n_residual_layers", 1),
            ratios=tuple(_pick("mimi.seanet", seanet, "ratios")),
            kernel_size=seanet.get("kernel_size", 7),
            residual_kernel_size=seanet.get("residual_kernel_size", 3),
            last_kernel_size=seanet.get("last_kernel_size", 3),
            compress=seanet.get("compress", 2),
        ),
        transformer=MimiTransformerConfig(
            d_model=dim,
            num_heads=_pick("mimi.transformer", trans, "num_heads"),
            num_layers=_pick("mimi.transformer", trans, "num_layers"),
            dim_feedforward=_pick("mimi.transformer", trans, "dim_feedforward"),
            context=trans.get("context", 250),
            max_period=float(trans.get("max_period", 10_000)),
        ),
        quantizer=QuantizerConfig(
            dimension=_pick("mimi.quantizer", quant, "dimension"),
            n_q=_pick("mimi.quantizer", quant, "n_q"),
            bins=_pick("mimi.quantizer", quant, "bins"),
        ),
    )
    lm_cfg = LMConfig(
        dim=_pick("lm", lm, "dim"),
        num_heads=_pick("lm", lm, "num_heads"),
        num_layers=_pick("lm", lm, "num_layers"),
        hidden_scale=float(lm.get("hidden_scale", 4.125)),
        context=lm.get("context", 3000),
        max_period=float(lm.get("max_period", 10_000)),
        n_q=lm.get("n_q", 16),
        dep_q=16,  # the reference loader overrides any dep_q with 16; so do we
        card=lm.get("card", 2048),
        text_card=_pick("lm", lm, "text_card"),
        delays=tuple(lm.get("delays", LMConfig.delays)),
        depformer_dim=_pick("lm", lm, "depformer_dim"),
        depformer_num_heads=_pick("lm", lm, "depformer_num_heads"),
        depformer_num_layers=_pick("lm", lm, "depformer_num_layers"),
        depformer_dim_feedforward=_pick("lm", lm, "depformer_dim_feedforward"),
    )
    config = ModelConfig(mimi=mimi_cfg, lm=lm_cfg)
    validate(config)
    return config


def validate(config: ModelConfig) -> None:
    """Check the constraints that the PersonaPlex pipeline hard-codes: 16 audio streams with their 17
    delays, Mimi's bins as the LM's audio vocabulary, 1920 samples a frame, 8 codebooks, even head widths."""
    lm, mimi = config.lm, config.mimi
    if lm.n_q != 2 * CODES_PER_STREAM or len(lm.delays) != lm.num_streams:
        raise ConfigError(f"lm.n_q must be {2 * CODES_PER_STREAM} with {2 * CODES_PER_STREAM + 1} delays")
    if lm.card != mimi.quantizer.bins or lm.card <= max(SILENCE_TOKENS + SINE_TOKENS):
        raise ConfigError(f"lm.card ({lm.card}) must equal mimi bins and exceed the prompt token ids")
    if mimi.seanet.hop_length * mimi.downsample_stride != FRAME_SIZE:
        raise ConfigError(f"mimi ratios must give {FRAME_SIZE} samples per frame")
    if mimi.quantizer.n_q < CODES_PER_STREAM:
        raise ConfigError(f"mimi quantizer needs at least {CODES_PER_STREAM} codebooks")
    for name, d, h in (
        ("lm", lm.dim, lm.num_heads),
        ("depformer", lm.depformer_dim, lm.depformer_num_heads),
        ("mimi", mimi.transformer.d_model, mimi.transformer.num_heads),
    ):
        if d % h or (d // h) % 2:
            raise ConfigError(f"{name}: dim {d} must split into {h} heads of even width")


def load_config(path: str | Path) -> ModelConfig:
    """Read a JSON file in the reference's hyper-parameter names (see `tiny_config.json`)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from exc
    return config_from_reference_dict(raw)
