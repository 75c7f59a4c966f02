"""Loading the release: hub or local folder, voices, meta-device build, one patch table, strict load.

Implements:
  * `resolve_checkpoint`: the release files from a local folder (exact file names) or from a
    hub repo through huggingface_hub (token from `HF_TOKEN`), with messages that say what to do
    when a file is missing, the repo is gated, the token is missing or there is no network;
  * voices from `voices/` or from `voices.tgz`, extracted safely once into a cache folder;
  * `patch_state_dict`: the reference's two depformer patches (8 -> 16 steps) and the legacy
    codebook buffer names, driven by one table; `load_strict`: missing keys and wrong shapes
    fail with the key named, unexpected keys are reported;
  * `load_models`: Mimi (float32) and the LM (bf16 by default on CUDA, float32 elsewhere; its
    weights optionally quantized to 8 bits, `formats`), built on the meta device and filled from
    the files, plus the tokenizer and voice table;
  * `load_voice_embeddings`: a `.pt` voice, with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .config import ModelConfig
from .formats import quantize
from .lm import LMModel
from .mimi import Mimi
from .persona import PromptError, VoicePrompt, voice_from_saved

logger = logging.getLogger(__name__)

DEFAULT_REPO = "nvidia/personaplex-7b-v1"
LM_FILE = "model.safetensors"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_FILE = "tokenizer_spm_32k_3.model"
VOICES_ARCHIVE = "voices.tgz"
VOICES_DIR = "voices"
VOICE_SUFFIXES = (".pt", ".wav", ".flac", ".mp3", ".ogg")
_VOICE_MEMBER = re.compile(r"^voices/[A-Za-z0-9_.-]+$")


class CheckpointError(UserError):
    """The weights cannot be found or used; the message says what to do."""


@dataclass(frozen=True)
class CheckpointFiles:
    lm: Path
    mimi: Path
    tokenizer: Path
    voices: Path | None  # a folder of voice prompts, if the checkpoint has one


# --- locating the files -------------------------------------------------------------------
def _hub_token_hint() -> str:
    if os.environ.get("HF_TOKEN"):
        return "the token in HF_TOKEN has no access to it yet"
    return "HF_TOKEN is not set: create a read token at https://huggingface.co/settings/tokens and export HF_TOKEN"


def hub_file(repo: str, name: str) -> Path:
    """Download one file of `repo` (or take it from the local cache)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(hf_hub_download(repo, name))
    except GatedRepoError as exc:
        raise CheckpointError(
            f"{repo} is a gated model: accept its license at https://huggingface.co/{repo} "
            f"while logged in; {_hub_token_hint()}"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise CheckpointError(
            f"the hub has no repository {repo} that this token can see (check the name; if it is "
            f"private or gated, {_hub_token_hint()})"
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(
            f"cannot download {name} from {repo}: no connection to the hub (or HF_HUB_OFFLINE is set) "
            f"and no cached copy. "
            f"Connect to the internet, or pass --checkpoint DIR with the release files"
        ) from exc
    except EntryNotFoundError as exc:  # after LocalEntryNotFoundError, its subclass
        raise CheckpointError(f"{repo} has no file {name}: is it a PersonaPlex checkpoint?") from exc
    except HfHubHTTPError as exc:
        raise CheckpointError(f"downloading {name} from {repo} failed: {exc}") from exc


def _local_file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise CheckpointError(
            f"missing {name}: looked for {path}. A checkpoint folder holds the release files "
            f"{LM_FILE}, {MIMI_FILE}, {TOKENIZER_FILE} and {VOICES_DIR}/ or {VOICES_ARCHIVE} "
            f"(`huggingface-cli download {DEFAULT_REPO} --local-dir DIR`)"
        )
    return path


def resolve_checkpoint(checkpoint: str | Path | None = None, hf_repo: str | None = None) -> CheckpointFiles:
    """The release files from a local folder, or else from a hub repo (default the release)."""
    if checkpoint is not None:
        folder = Path(checkpoint)
        if not folder.is_dir():
            raise CheckpointError(f"checkpoint folder not found: {folder}")
        return CheckpointFiles(
            lm=_local_file(folder, LM_FILE),
            mimi=_local_file(folder, MIMI_FILE),
            tokenizer=_local_file(folder, TOKENIZER_FILE),
            voices=local_voices_dir(folder),
        )
    repo = hf_repo or DEFAULT_REPO
    files = CheckpointFiles(
        lm=hub_file(repo, LM_FILE),
        mimi=hub_file(repo, MIMI_FILE),
        tokenizer=hub_file(repo, TOKENIZER_FILE),
        voices=None,
    )
    return CheckpointFiles(files.lm, files.mimi, files.tokenizer, extract_voices(hub_file(repo, VOICES_ARCHIVE)))


# --- voices ---------------------------------------------------------------------------------
def cache_root() -> Path:
    base = os.environ.get("PERSONAPLEX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "personaplex"
    )
    return Path(base)


def local_voices_dir(folder: Path) -> Path | None:
    if (folder / VOICES_DIR).is_dir():
        return folder / VOICES_DIR
    if (folder / VOICES_ARCHIVE).is_file():
        return extract_voices(folder / VOICES_ARCHIVE)
    return None


def extract_voices(archive: Path) -> Path:
    """Extract `voices/*` of a voices.tgz once, into a cache folder named by its content hash.

    Only plain files directly under `voices/` with plain names are extracted: no links, no
    absolute paths, no `..`, whatever the archive holds.
    """
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:16]
    target = cache_root() / "voices" / digest
    if (target / ".complete").exists():
        return target / VOICES_DIR
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".extract-"))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = [m for m in tar.getmembers() if m.isfile() and _VOICE_MEMBER.match(m.name)]
                tar.extractall(staging, members=members, filter="data")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise CheckpointError(f"{archive} is not a readable gzip tar archive: {exc}") from exc
        if not members:
            raise CheckpointError(f"{archive} did not contain a '{VOICES_DIR}/' folder of voice prompts")
        (staging / ".complete").touch()
        if not (target / ".complete").exists():
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target / VOICES_DIR


def voice_files(folder: Path | None) -> dict[str, Path]:
    """Voice name -> file. A `.pt` wins over an audio file of the same name."""
    voices: dict[str, Path] = {}
    for path in sorted(folder.iterdir()) if folder is not None else []:
        suffix = path.suffix.lower()
        if path.is_file() and suffix in VOICE_SUFFIXES and (path.stem not in voices or suffix == ".pt"):
            voices[path.stem] = path
    return voices


def load_voice_embeddings(path: Path, config: ModelConfig) -> VoicePrompt:
    """A voice saved by the reference (`{"embeddings", "cache"}`), loaded with weights_only=True."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise CheckpointError(f"{path.name} is not a readable voice prompt file: {exc}") from exc
    if not isinstance(data, dict) or not {"embeddings", "cache"} <= set(data):
        raise CheckpointError(f"{path.name} is not a PersonaPlex voice prompt (needs 'embeddings' and 'cache')")
    try:
        return voice_from_saved(data["embeddings"].float(), data["cache"], config.lm)
    except PromptError as exc:
        raise CheckpointError(f"{path.name}: {exc}") from exc


# --- weights --------------------------------------------------------------------------------
# Legacy names of Mimi's codebook buffers (renamed on load by the reference as well).
_RENAMES = (
    ("._codebook.inited", "._codebook._initialized"),
    ("._codebook.cluster_size", "._codebook.cluster_usage"),
    ("._codebook.embed_avg", "._codebook.embedding_sum"),
    ("._codebook.embed_sum", "._codebook.embedding_sum"),
)
# Per-step depformer weights that an 8-step checkpoint lacks: step 8 + i reuses step i.
_PER_STEP_GROUPS = ("gating", "linears", "depformer_in", "depformer_emb")
_COPIED_STEPS = tuple(zip(range(8), range(8, 16)))


def patch_state_dict(state: dict[str, torch.Tensor], expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The one place where checkpoint tensors are renamed, expanded or copied, as the reference's loader does.

    1. legacy codebook buffer names; 2. depformer attention weights of 8 steps concatenated with
    themselves to 16 steps; 3. missing per-step weights 8..15 copied from 0..7. A release
    checkpoint (16 steps) passes through unchanged.
    """
    patched = {}
    for name, tensor in state.items():
        for old, new in _RENAMES:
            if name.endswith(old):
                name = name[: -len(old)] + new
        shape = expected.get(name)
        if shape is not None and "depformer" in name and "self_attn" in name and 2 * tensor.shape[0] == shape[0]:
            logger.info("expanding %s from 8 to 16 depformer steps", name)
            tensor = torch.cat([tensor, tensor], dim=0)
        patched[name] = tensor
    for name in expected:
        if name in patched:
            continue
        for old, new in _COPIED_STEPS:
            source = next(
                (name.replace(f"{g}.{new}.", f"{g}.{old}.") for g in _PER_STEP_GROUPS if f"{g}.{new}." in name), None
            )
            if source is not None and source in patched:
                logger.info("copying %s <- %s", name, source)
                patched[name] = patched[source]
                break
    return patched


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Assign `state` to a meta-built model: every key present with its shape, or a clear error."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = patch_state_dict(state, expected)
    missing = [k for k in expected if k not in state]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{what} lacks {len(missing)} tensors the model needs: {shown}")
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise CheckpointError(
                f"{what}: tensor {key} has shape {list(state[key].shape)} but the model expects "
                f"{list(shape)}; pass the matching --config for a non-release checkpoint"
            )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        logger.warning("%s has %d tensors the model does not use, e.g. %s", what, len(unexpected), unexpected[0])
    model.load_state_dict({k: state[k] for k in expected}, strict=True, assign=True)


def read_safetensors(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path.name} is not a readable safetensors file ({exc}); download it again") from exc


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_lm(config: ModelConfig, path: Path, device: torch.device, dtype: torch.dtype) -> LMModel:
    with torch.device("meta"):
        lm = LMModel(config.lm)
    state = {k: v.to(dtype) for k, v in read_safetensors(path, device).items()}
    load_strict(lm, state, path.name)
    return lm.eval().requires_grad_(False)


def build_mimi(config: ModelConfig, path: Path, device: torch.device) -> Mimi:
    with torch.device("meta"):
        mimi = Mimi(config.mimi)
    state = {k: v.float() for k, v in read_safetensors(path, device).items()}
    load_strict(mimi, state, path.name)
    return mimi.eval().requires_grad_(False)


def load_tokenizer(path: Path, text_card: int):  # -> sentencepiece.SentencePieceProcessor
    import sentencepiece

    try:
        tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path.name} is not a readable SentencePiece model: {exc}") from exc
    if tokenizer.get_piece_size() != text_card:
        raise CheckpointError(
            f"{path.name} has {tokenizer.get_piece_size()} pieces but the LM predicts {text_card} text ids"
        )
    return tokenizer


@dataclass
class Models:
    """Everything a conversation needs, loaded once on one device."""

    config: ModelConfig
    mimi: Mimi
    lm: LMModel
    tokenizer: object  # sentencepiece.SentencePieceProcessor
    voices: dict[str, Path]
    device: torch.device
    weights: str = "bf16"  # the LM's weight format (`formats.WEIGHT_FORMATS`)


def load_models(
    files: CheckpointFiles, config: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
    weights: str = "bf16",
) -> Models:
    """Mimi and the LM on `device`, the LM computing in `dtype` (default: bf16 on CUDA, float32
    elsewhere) with its weights in `weights`: as loaded, or quantized at load from the release's
    bf16 file (`formats`): read into host memory, and quantized on `device` a matrix at a time, so
    that the device never holds the full-width weights (a 24 GB card serves the 7B in 8 bits)."""
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    tokenizer = load_tokenizer(files.tokenizer, config.lm.text_card)
    mimi = build_mimi(config, files.mimi, device)
    if weights == "bf16":
        lm = build_lm(config, files.lm, device, dtype)
    else:  # full width in host memory only; each matrix reaches the device in 8 bits
        lm = build_lm(config, files.lm, torch.device("cpu"), dtype)
        quantize(lm, weights, device)
        lm.to(device)  # what stays full width: the norms
    return Models(config, mimi, lm, tokenizer, voice_files(files.voices), device, weights)
