"""Paths of the fixtures and small helpers shared by the tests."""

from __future__ import annotations

import tempfile
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


def noise_pcm(frames: int, seed: int = 0):
    """A gliding tone with noise, float32 [frames * 1920]: audio that moves every code."""
    import torch

    from personaplex.model.config import FRAME_SIZE

    g = torch.Generator().manual_seed(seed)
    t = torch.arange(frames * FRAME_SIZE) / 24000
    tone = 0.3 * torch.sin(2 * torch.pi * 220 * t * (1 + 0.5 * torch.sin(2 * torch.pi * 0.7 * t)))
    return (tone + 0.05 * torch.randn(frames * FRAME_SIZE, generator=g)).float()


def user_audio(frames: int, seed: int):
    """`noise_pcm` as a list of [1920] frames."""
    from personaplex.model.config import FRAME_SIZE

    pcm = noise_pcm(frames, seed)
    return [pcm[i * FRAME_SIZE : (i + 1) * FRAME_SIZE] for i in range(frames)]


def load_client():
    """examples/webrtc_client.py as a module: the browser's signalling, from Python."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("webrtc_client", ROOT / "examples" / "webrtc_client.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def copy_checkpoint(dst: Path, skip: tuple[str, ...] = ()) -> Path:
    """The tiny checkpoint copied to `dst`, without the files named in `skip`."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in CHECKPOINT.rglob("*"):
        rel = path.relative_to(CHECKPOINT)
        if path.is_file() and rel.name not in skip:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            (dst / rel).write_bytes(path.read_bytes())
    return dst


def start_tiny_service(max_sessions: int = 2):
    """A `Service` on the tiny golden checkpoint (CPU), loaded and ready."""
    from personaplex.serve.service import Service, Settings

    service = Service(Settings(checkpoint=str(CHECKPOINT), config=str(TINY_CONFIG), device="cpu", max_sessions=max_sessions))
    service.start()
    status = service.wait_ready(120)
    assert status.ready, status.message
    return service


def without_torch() -> dict[str, str]:
    """The environment of a Python where `import torch` fails as if torch were not installed (a
    `sitecustomize` on its path refuses to find it): what a page in front of a cluster runs in,
    in a small CPU container. (Not `sys.modules["torch"] = None`: libraries that look for torch
    in `sys.modules`, as SciPy does, would take that None for torch.)"""
    import os

    folder = Path(tempfile.mkdtemp(prefix="no-torch-"))
    (folder / "sitecustomize.py").write_text(
        "import sys\n"
        "class NoTorch:  # as if it were not installed: import torch -> ModuleNotFoundError\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'torchaudio', 'torchvision'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoTorch())\n"
    )
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningApp:
    """`python app.py` on the tiny checkpoint, in a subprocess, as the README starts it (with
    `model=False`, no model is named: the README's first command)."""

    def __init__(self, *extra: str, max_sessions: int = 2, env: dict[str, str] | None = None, model: bool = True) -> None:
        import os
        import subprocess
        import sys
        import tempfile

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        chosen = ["--checkpoint", str(CHECKPOINT), "--config", str(TINY_CONFIG), "--device", "cpu"] if model else []
        args = [sys.executable, str(ROOT / "app.py"), *chosen, "--port", str(self.port), "--max-sessions", str(max_sessions), *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))

    def wait_ready(self, timeout: float = 120.0, marker: str = "ready: ready") -> None:
        """Until the page is up and the log has `marker` (a page in front of a cluster logs
        "ready: the engine cluster")."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.output()
            if marker in text and "the page is up" in text:
                return
            if self.process.poll() is not None or "failed:" in text:
                break
            time.sleep(0.3)
        raise AssertionError(f"the app did not become ready:\n{self.output()[-3000:]}")

    def rss_mb(self) -> float:
        """The server's resident memory now."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except Exception:
            self.process.kill()


ROOT = Path(__file__).resolve().parents[1]


# --- the page in headless Chromium (Debian's, never a downloaded one) ----------------------------
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
START_TILE = "#webrtc div[title='grant webcam access'] button"  # fastrtc's microphone tile, labelled "Start the call"
CALL_BUTTON = "#webrtc button[aria-label='start stream']"  # fastrtc's start/stop button once the microphone is granted


def browser(p, mic: Path | None, viewport: dict):
    profile = tempfile.mkdtemp()
    args = [*CHROMIUM_ARGS, "--autoplay-policy=no-user-gesture-required"]
    if mic is not None:
        args += ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={mic}"]
    ctx = p.chromium.launch_persistent_context(profile, executable_path=str(CHROMIUM), headless=True, args=args,
                                               permissions=["microphone"] if mic else [], viewport=viewport)
    return ctx, profile


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()
