"""Request sizes bounded at the door (`web.limits`), driven as an ASGI server drives it: a body
over the limit is refused before it is read, each client's uploads have a budget, the disk keeps
its reserve, and every refusal says what to do."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from web.limits import MB, RequestLimits, RequestSizes, UploadBudget, client_of


class Inner:
    """The app behind the middleware: reads the whole body, answers 200."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.disconnected = 0

    async def __call__(self, scope, receive, send) -> None:
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected += 1
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def request(middleware, path: str, body: bytes, length: int | None = None, client: str = "10.0.0.1",
            headers: tuple = (), chunk: int = 64 * 1024) -> tuple[int | None, dict | None, int]:
    """(status, JSON answer if refused, body chunks the app asked for)."""
    chunks = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    given = 0
    sent: list[dict] = []
    declared = [(b"content-length", str(len(body) if length is None else length).encode())] if length != -1 else []
    scope = {"type": "http", "method": "POST", "path": path, "client": (client, 5000),
             "headers": [(b"content-type", b"application/json"), *declared, *headers]}

    async def receive():
        nonlocal given
        given += 1
        if given > len(chunks):
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunks[given - 1], "more_body": given < len(chunks)}

    async def send(message):
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    status = sent[0]["status"] if sent else None  # (none: the app saw the client go away)
    answer = json.loads(sent[1]["body"]) if status not in (200, None) else None
    return status, answer, given


def middleware(tmp_path: Path, **limits) -> tuple[RequestLimits, Inner]:
    inner = Inner()
    return RequestLimits(inner, RequestSizes(**{"disk_reserve": 0, **limits}), lambda: tmp_path), inner


def test_a_small_request_passes_untouched(tmp_path):
    limits, inner = middleware(tmp_path)
    body = json.dumps({"data": ["TESTV0", ""], "fn_index": 3}).encode()
    assert request(limits, "/gradio_api/queue/join", body)[0] == 200 and inner.bodies == [body]


def test_a_request_with_a_10_mb_value_is_refused_before_it_is_read(tmp_path):
    limits, inner = middleware(tmp_path)
    body = json.dumps({"data": ["x" * 10 * MB, ""], "fn_index": 3}).encode()
    status, answer, read = request(limits, "/gradio_api/queue/join", body)
    assert status == 413 and "limited to 256 KB" in answer["detail"] and inner.bodies == []
    assert read == len(body) // (64 * 1024) + 1  # read and dropped, so that the client reads the answer


def test_a_body_longer_than_it_said_is_cut_off(tmp_path):
    limits, inner = middleware(tmp_path)
    status, _, _ = request(limits, "/gradio_api/component_server/", b"y" * 600_000, length=1000)
    assert status is None and inner.disconnected == 1 and inner.bodies == []  # the app saw the client go away


def test_a_request_that_does_not_say_its_length_is_refused(tmp_path):
    limits, _ = middleware(tmp_path)
    status, answer, _ = request(limits, "/gradio_api/upload", b"z" * 100, length=-1)
    assert status == 411 and "Content-Length" in answer["detail"]


def test_each_client_has_an_upload_budget_and_is_told_when_it_is_spent(tmp_path):
    limits, _inner = middleware(tmp_path, upload_bytes=250 * MB)
    big = 99 * MB
    statuses = []
    for _ in range(10):  # ten 99 MB uploads from one address: the probe's attack
        status, answer, _ = request(limits, "/gradio_api/upload", b"", length=big)
        statuses.append(status)
    assert statuses == [200, 200] + [429] * 8
    assert "at most 250 MB every 10 minutes" in answer["detail"] and "try again in" in answer["detail"]
    assert request(limits, "/gradio_api/upload", b"", length=big, client="10.0.0.2")[0] == 200  # others are not affected
    assert request(limits, "/gradio_api/queue/join", b"{}")[0] == 200  # nor are its other requests


def test_the_budget_comes_back_after_the_window():
    now = [0.0]
    budget = UploadBudget(100, 60.0, clock=lambda: now[0])
    budget.charge("a", 80)
    try:
        budget.charge("a", 30)
        raise AssertionError("over budget")
    except Exception as exc:
        assert getattr(exc, "status", None) == 429
    now[0] = 61.0
    budget.charge("a", 80)


def test_uploads_stop_while_the_disk_is_short_of_its_reserve(tmp_path):
    limits, _ = middleware(tmp_path, disk_reserve=1 << 62)  # more than any disk holds
    status, answer, _ = request(limits, "/gradio_api/upload", b"", length=1000)
    assert status == 507 and "short of disk space" in answer["detail"]
    assert request(limits, "/gradio_api/queue/join", b"{}")[0] == 200  # the page still works


def test_behind_a_trusted_proxy_the_client_is_the_address_it_saw():
    scope = {"client": ("10.1.1.1", 1), "headers": [(b"x-forwarded-for", b"6.6.6.6, 203.0.113.9")]}
    assert client_of(scope, trust_proxy=True) == "203.0.113.9"  # the first entry is the client's own say
    assert client_of(scope, trust_proxy=False) == "10.1.1.1"
