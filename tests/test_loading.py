"""Checkpoint loading: local folders, hub errors, voices, the patch table, strict checks."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from personaplex.model.config import TINY
from personaplex.model.loading import (
    LM_FILE,
    MIMI_FILE,
    TOKENIZER_FILE,
    CheckpointError,
    build_lm,
    build_mimi,
    extract_voices,
    load_tokenizer,
    load_voice_embeddings,
    resolve_checkpoint,
    voice_files,
)

from .helpers import CHECKPOINT, copy_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("missing", [LM_FILE, MIMI_FILE, TOKENIZER_FILE])
def test_missing_local_file_says_which_and_where(tmp_path, missing):
    folder = copy_checkpoint(tmp_path / "ckpt", skip=(missing,))
    with pytest.raises(CheckpointError, match=f"missing {missing}: looked for {folder / missing}"):
        resolve_checkpoint(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        resolve_checkpoint(tmp_path / "nowhere")


def test_legacy_8_step_checkpoint_is_expanded_like_the_reference(tmp_path):
    state = load_file(str(CHECKPOINT / LM_FILE))
    legacy = {}
    for name, tensor in state.items():
        if any(f"{g}.{i}." in name for g in ("gating", "linears", "depformer_in", "depformer_emb") for i in range(8, 16)):
            continue
        if "depformer" in name and "self_attn" in name:
            tensor = tensor[: tensor.shape[0] // 2]
        legacy[name] = tensor
    save_file(legacy, str(tmp_path / LM_FILE))
    lm = build_lm(TINY, tmp_path / LM_FILE, torch.device("cpu"), torch.float32)
    sd = lm.state_dict()
    w = sd["depformer.layers.0.self_attn.in_proj_weight"]
    assert torch.equal(w[: w.shape[0] // 2], w[w.shape[0] // 2 :])
    assert torch.equal(sd["linears.12.weight"], sd["linears.4.weight"])
    assert torch.equal(sd["depformer.layers.1.gating.9.linear_in.weight"], sd["depformer.layers.1.gating.1.linear_in.weight"])
    assert torch.equal(sd["depformer_emb.14.weight"], sd["depformer_emb.6.weight"])
    assert torch.equal(sd["depformer_in.8.weight"], sd["depformer_in.0.weight"])


def test_release_checkpoint_loads_unchanged_in_bf16():
    lm = build_lm(TINY, CHECKPOINT / LM_FILE, torch.device("cpu"), torch.bfloat16)
    state = load_file(str(CHECKPOINT / LM_FILE))
    # RMSNorm scales are held in float32 (their math is float32; bf16 widens to it exactly)
    assert all(v.dtype == (torch.float32 if k.endswith(".alpha") else torch.bfloat16) for k, v in lm.state_dict().items())
    assert all(torch.equal(lm.state_dict()[k], v.to(lm.state_dict()[k].dtype)) for k, v in state.items())


def test_missing_tensor_fails_with_its_name(tmp_path):
    state = load_file(str(CHECKPOINT / LM_FILE))
    del state["transformer.layers.1.gating.linear_out.weight"]
    save_file(state, str(tmp_path / LM_FILE))
    with pytest.raises(CheckpointError, match=r"lacks 1 tensors .*transformer\.layers\.1\.gating\.linear_out\.weight"):
        build_lm(TINY, tmp_path / LM_FILE, torch.device("cpu"), torch.float32)


def test_wrong_shape_fails_with_the_key(tmp_path):
    state = load_file(str(CHECKPOINT / LM_FILE))
    state["text_linear.weight"] = state["text_linear.weight"][:100]
    save_file(state, str(tmp_path / LM_FILE))
    with pytest.raises(CheckpointError, match=r"text_linear.weight has shape \[100, 32\] but the model expects \[120, 32\]"):
        build_lm(TINY, tmp_path / LM_FILE, torch.device("cpu"), torch.float32)


def test_unexpected_tensor_is_reported_and_ignored(tmp_path, caplog):
    state = load_file(str(CHECKPOINT / LM_FILE))
    state["something.extra"] = torch.zeros(3)
    save_file(state, str(tmp_path / LM_FILE))
    with caplog.at_level(logging.WARNING):
        build_lm(TINY, tmp_path / LM_FILE, torch.device("cpu"), torch.float32)
    assert "something.extra" in caplog.text


def test_legacy_codebook_buffer_names_are_renamed(tmp_path):
    state = load_file(str(CHECKPOINT / MIMI_FILE))
    renamed = {k.replace("cluster_usage", "cluster_size").replace("embedding_sum", "embed_avg").replace("_initialized", "inited"): v for k, v in state.items()}
    save_file(renamed, str(tmp_path / MIMI_FILE))
    mimi = build_mimi(TINY, tmp_path / MIMI_FILE, torch.device("cpu"))
    assert torch.equal(mimi.state_dict()["quantizer.rvq_rest.vq.layers.3._codebook.embedding_sum"], state["quantizer.rvq_rest.vq.layers.3._codebook.embedding_sum"])


def test_corrupt_safetensors_and_tokenizer(tmp_path):
    (tmp_path / LM_FILE).write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        build_lm(TINY, tmp_path / LM_FILE, torch.device("cpu"), torch.float32)
    (tmp_path / TOKENIZER_FILE).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable SentencePiece model"):
        load_tokenizer(tmp_path / TOKENIZER_FILE, 120)
    with pytest.raises(CheckpointError, match="has 120 pieces but the LM predicts 32000"):
        load_tokenizer(CHECKPOINT / TOKENIZER_FILE, 32000)


# --- voices ---------------------------------------------------------------------------------
def make_tgz(path: Path, members: dict[str, bytes], symlink: tuple[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink[0])
            info.type = tarfile.SYMTYPE
            info.linkname = symlink[1]
            tar.addfile(info)
    return path


def test_voices_archive_is_extracted_once_and_safely(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONAPLEX_CACHE", str(tmp_path / "cache"))
    pt = (CHECKPOINT / "voices" / "TESTV0.pt").read_bytes()
    archive = make_tgz(
        tmp_path / "voices.tgz",
        {"voices/NATF0.pt": pt, "voices/VARM1.pt": pt, "../evil.pt": b"x", "/abs/evil.pt": b"x", "voices/../../evil2.pt": b"x"},
        symlink=("voices/link.pt", "/etc/passwd"),
    )
    folder = extract_voices(archive)
    assert sorted(p.name for p in folder.iterdir()) == ["NATF0.pt", "VARM1.pt"]
    assert not list(tmp_path.rglob("evil*"))
    assert voice_files(folder).keys() == {"NATF0", "VARM1"}
    marker = folder.parent / ".complete"
    stamp = marker.stat().st_mtime_ns
    assert extract_voices(archive) == folder and marker.stat().st_mtime_ns == stamp


def test_voices_archive_without_voices_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONAPLEX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError, match="did not contain a 'voices/' folder"):
        extract_voices(make_tgz(tmp_path / "voices.tgz", {"other/x.pt": b"1"}))
    (tmp_path / "bad.tgz").write_bytes(b"not gzip")
    with pytest.raises(CheckpointError, match="not a readable gzip tar archive"):
        extract_voices(tmp_path / "bad.tgz")


def test_voices_archive_in_a_checkpoint_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONAPLEX_CACHE", str(tmp_path / "cache"))
    folder = copy_checkpoint(tmp_path / "ckpt")
    pt = (folder / "voices" / "TESTV0.pt").read_bytes()
    for p in (folder / "voices").iterdir():
        p.unlink()
    (folder / "voices").rmdir()
    make_tgz(folder / "voices.tgz", {"voices/TESTV0.pt": pt})
    assert voice_files(resolve_checkpoint(folder).voices).keys() == {"TESTV0"}


def test_pt_voice_prefers_over_audio_and_loads_weights_only(tmp_path):
    assert voice_files(CHECKPOINT / "voices") == {"TESTV0": CHECKPOINT / "voices" / "TESTV0.pt"}
    voice = load_voice_embeddings(CHECKPOINT / "voices" / "TESTV0.pt", TINY)
    assert voice.num_frames == 20 and voice.embeddings.shape == (19, 32)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"embeddings": torch.zeros(3, 1, 1, 32), "cache": torch.zeros(1, 17, 4), "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a readable voice prompt file"):
        load_voice_embeddings(tmp_path / "evil.pt", TINY)
    torch.save({"embeddings": torch.zeros(3, 1, 1, 64), "cache": torch.zeros(1, 17, 4)}, tmp_path / "wide.pt")
    with pytest.raises(CheckpointError, match=r"must be \[N, 1, 1, 32\]"):
        load_voice_embeddings(tmp_path / "wide.pt", TINY)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="needs 'embeddings' and 'cache'"):
        load_voice_embeddings(tmp_path / "other.pt", TINY)


# --- the hub --------------------------------------------------------------------------------
class _FakeHub(BaseHTTPRequestHandler):
    error_code = "GatedRepo"

    def _answer(self) -> None:
        self.send_response(404 if self.error_code == "EntryNotFound" else 401)
        self.send_header("X-Error-Code", self.error_code)
        self.send_header("X-Error-Message", "fake hub")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _answer

    def log_message(self, *args) -> None:
        pass


def hub_download_message(tmp_path: Path, endpoint: str, token: str | None, **extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(ROOT), **extra)
    if token:
        env["HF_TOKEN"] = token
    code = "from personaplex.model.loading import hub_file; hub_file('nvidia/personaplex-7b-v1', 'model.safetensors')"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    return run.stderr.strip().splitlines()[-1]


@pytest.fixture
def fake_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.mark.parametrize(
    "error_code,token,message",
    [
        ("GatedRepo", None, "is a gated model: accept its license at https://huggingface.co/nvidia/personaplex-7b-v1 .*HF_TOKEN is not set"),
        ("GatedRepo", "hf_fake", "is a gated model: .*the token in HF_TOKEN has no access to it yet"),
        ("RepoNotFound", None, "no repository nvidia/personaplex-7b-v1"),
        ("EntryNotFound", None, "has no file model.safetensors"),
    ],
)
def test_hub_errors_say_what_to_do(tmp_path, fake_hub, error_code, token, message):
    _FakeHub.error_code = error_code
    line = hub_download_message(tmp_path, f"http://127.0.0.1:{fake_hub.server_port}", token)
    assert line.startswith("personaplex.model.loading.CheckpointError")
    assert __import__("re").search(message, line), line


def test_no_network_says_so(tmp_path):
    # HF_HUB_OFFLINE takes the same path as a dead network, without its retries (about 25 s).
    line = hub_download_message(tmp_path, "http://127.0.0.1:9", None, HF_HUB_OFFLINE="1")
    assert "no connection to the hub" in line and "no cached copy" in line and "--checkpoint DIR" in line
