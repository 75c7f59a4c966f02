"""A page in front of a cluster (`app.py --engine-url`) needs no model and no torch: it runs in a
Python where importing torch fails, serves its page, and says that it waits for the cluster.
The layering behind it (imports only downward, no gradio in the package) is checked here too."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import httpx

from .helpers import ROOT, RunningApp, free_port, without_torch

WINGS = ("model", "runtime", "serve")  # each imports only the ones before it


def test_the_page_in_front_of_a_cluster_is_served_without_torch():
    nowhere = f"ws://127.0.0.1:{free_port()}/api/chat"  # no cluster: the page says it waits for one
    app = RunningApp("--engine-url", nowhere, model=False, env=without_torch())
    try:
        app.wait_ready(marker="waiting for the engine cluster")
        page = httpx.get(app.url, timeout=30)
        assert page.status_code == 200 and "PersonaPlex Live" in page.text and "engine cluster" in page.text
        assert "Traceback" not in app.output()
    finally:
        app.stop()


def imports_of(path: Path) -> set[str]:
    """The personaplex, web and gradio modules a file imports (relative imports made absolute)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package if node.level else ""
            module = ".".join(filter(None, [base, node.module]))
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return found


def test_imports_run_only_downward():
    """model imports no runtime or serve; runtime no serve; nothing in personaplex imports the page
    (web), gradio or fastrtc; only serve/cluster imports Ray; the session's side of runtime and
    serve's contract import no torch (a page in front of a cluster runs them)."""
    for path in sorted((ROOT / "personaplex").rglob("*.py")):
        imported = imports_of(path)
        wing = path.relative_to(ROOT / "personaplex").parts[0] if path.parent != ROOT / "personaplex" else None
        above = WINGS[WINGS.index(wing) + 1 :] if wing in WINGS else ()
        for name in imported:
            top = name.split(".")
            assert top[0] not in ("web", "app", "gradio", "fastrtc"), f"{path}: imports {name}"
            assert top[0] != "ray" or path.name == "cluster.py", f"{path}: imports {name}"
            assert not (top[0] == "personaplex" and len(top) > 1 and top[1] in above), f"{path}: imports {name} (upward)"


def test_the_contract_and_the_session_side_import_no_torch():
    import os
    import subprocess

    script = ("import personaplex.serve.contract, personaplex.serve.call, personaplex.serve.remote, personaplex.serve.api_chat\n"
              "import web.handler, web.events, web.call_page\n"
              "from personaplex.runtime.audio import normalize_loudness, read_audio\n"  # the codecs too (SciPy looks for torch)
              "from personaplex.serve.contract import read_voice_clip\n"
              "print(normalize_loudness(read_voice_clip('examples/voice_sample.wav')).size)\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=str(ROOT), capture_output=True, text=True, timeout=120,
                         env={**os.environ, **without_torch()})
    assert run.returncode == 0, run.stderr[-2000:]


def test_both_services_implement_the_contract():
    """`Service` and `RemoteService` have every member of `CallService`, methods with its parameters."""
    import inspect

    from personaplex.serve.contract import CallService
    from personaplex.serve.remote import RemoteService
    from personaplex.serve.service import Service

    members = [name for name in dir(CallService) if not name.startswith("_")] + list(CallService.__annotations__)
    for cls in (Service, RemoteService):
        for name in members:
            wanted = getattr(CallService, name, None)
            if callable(wanted):
                got = getattr(cls, name, None)
                assert callable(got), f"{cls.__name__}.{name} is missing"
                assert list(inspect.signature(got).parameters) == list(inspect.signature(wanted).parameters), (cls, name)
            elif isinstance(wanted, property):
                assert isinstance(getattr(cls, name, None), property) or name in vars(cls), f"{cls.__name__}.{name}"
    assert Service.has_model and not RemoteService.has_model


def test_a_page_only_install_says_what_it_needs_to_run_a_model():
    import os
    import subprocess

    env = {**os.environ, **without_torch()}
    run = subprocess.run([sys.executable, "app.py", "--port", str(free_port())], cwd=str(ROOT), env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "no model can run here" in run.stderr and "--engine-url" in run.stderr


def pins(path: Path) -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return dict(line.split("==") for line in lines if "==" in line)


def test_the_front_image_installs_the_apps_pins_without_torch():
    front, full = pins(ROOT / "requirements-front.txt"), pins(ROOT / "requirements.txt")
    assert "torch" not in front and all(full.get(name) == version for name, version in front.items())
    assert "requirements-front.txt" in (ROOT / "deploy" / "Dockerfile.front").read_text()
