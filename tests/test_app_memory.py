"""What an open page costs the server over time, with the app's page built in this process on the
tiny model: its status ticks (every 2 s, for as long as the page is open) leave nothing behind,
neither in Gradio's queue nor in the page's session (each component update Gradio applies adds a
copy of the component to the session, so no recurring event may send one)."""

from __future__ import annotations

import json

import httpx
import pytest

import app
from personaplex.runtime.session import REALTIME
from web.gradio_queue import explain_refusals, forget_finished_events

from .helpers import free_port, start_tiny_service


@pytest.fixture(scope="module")
def page():
    service = start_tiny_service(max_sessions=2)
    demo = app.build_ui(service, REALTIME, 2)
    demo.queue(default_concurrency_limit=8)
    forget_finished_events(demo)
    explain_refusals(demo)
    demo.launch(server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield demo
    demo.close()
    service.stop()


def ticks(demo, session: str, n: int) -> None:
    """The page's active timers firing `n` times, as the browser fires them."""
    with httpx.Client(base_url=demo.local_url.rstrip("/"), timeout=30) as client:
        config = client.get("/config").json()
        timers = {c["id"] for c in config["components"] if c["type"] == "timer" and c["props"].get("active", True)}
        values = {c["id"]: c.get("props", {}).get("value") for c in config["components"]}
        deps = [d for d in config["dependencies"] if any(t[0] in timers for t in d["targets"])]
        for _ in range(n):
            for dep in deps:
                body = {"data": [values.get(i) for i in dep["inputs"]], "fn_index": dep["id"], "session_hash": session}
                event_id = client.post("/gradio_api/queue/join", json=body).json()["event_id"]
                with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as stream:
                    for line in stream.iter_lines():
                        message = json.loads(line[5:]) if line.startswith("data:") else {}
                        if message.get("msg") == "process_completed" and message.get("event_id") == event_id:
                            assert message["success"], message
                            break


def test_an_open_pages_status_ticks_leave_nothing_behind(page):
    ticks(page, "page-1", 5)
    session = page.state_holder.session_data["page-1"]
    blocks, values = len(session.blocks_config.blocks), len(session.config_values)
    ticks(page, "page-1", 60)  # two minutes of an open page
    assert (len(session.blocks_config.blocks), len(session.config_values)) == (blocks, values)
    assert page._queue.event_ids_to_events == {} or len(page._queue.event_ids_to_events) <= 1
