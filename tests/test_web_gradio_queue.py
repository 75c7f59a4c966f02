"""Gradio's queue with `web.gradio_queue` on a small Blocks app in this process: it forgets the
events it has run (Gradio 5.50 keeps each one, with what it was sent, for good), and a request
that Gradio itself cannot read gets a message instead of `error: null` and a traceback."""

from __future__ import annotations

import json
import logging
import time

import gradio as gr
import httpx
import pytest

from web.gradio_queue import explain_refusals, forget_finished_events

from .helpers import free_port


@pytest.fixture(scope="module")
def demo():
    with gr.Blocks() as blocks:
        text, number, out = gr.Textbox(), gr.Number(), gr.Textbox()
        text.submit(lambda s: s[:3], text, out, api_name="echo")
        number.submit(lambda n: str(n), number, out, api_name="number")
    blocks.queue()
    forget_finished_events(blocks)
    explain_refusals(blocks)
    blocks.launch(server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield blocks
    blocks.close()


def run(demo: gr.Blocks, api_name: str, data: list) -> dict:
    """One event through the queue as a page sends it; its `process_completed` message."""
    fn_index = next(i for i, fn in demo.fns.items() if fn.api_name == api_name)
    session = f"s{time.monotonic_ns()}"
    with httpx.Client(base_url=demo.local_url.rstrip("/"), timeout=30) as client:
        joined = client.post("/gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": session})
        event_id = joined.json()["event_id"]
        with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as stream:
            for line in stream.iter_lines():
                message = json.loads(line[5:]) if line.startswith("data:") else {}
                if message.get("msg") == "process_completed" and message.get("event_id") == event_id:
                    return message
    raise AssertionError("no answer")


def test_the_queue_forgets_the_events_it_has_run(demo):
    for _ in range(30):  # an open page's status ticks, or requests carrying large values
        assert run(demo, "echo", ["x" * 100_000])["output"]["data"] == ["xxx"]
    deadline = time.monotonic() + 5
    while demo._queue.event_ids_to_events and time.monotonic() < deadline:
        time.sleep(0.05)
    queue = demo._queue
    assert queue.event_ids_to_events == {} and queue.event_analytics == {}
    assert len(queue._asyncio_tasks) <= 1 and not queue.server_app.iterators_to_reset  # (the last one's own task)


def test_a_request_gradio_cannot_read_gets_a_message_and_no_traceback(demo, caplog, capfd):
    with caplog.at_level(logging.INFO, logger="web.gradio_queue"):
        too_few = run(demo, "echo", [])
        not_a_number = run(demo, "number", [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}])
    for answer in (too_few, not_a_number):
        assert answer["success"] is False and answer["output"]["error"].startswith("the request was refused: ")
    assert "enough input values" in too_few["output"]["error"]
    assert len(not_a_number["output"]["error"]) <= 230
    assert "Traceback" not in capfd.readouterr().err
    assert sum("refused a request" in r.message for r in caplog.records) == 2


def test_the_queue_makes_no_summary_of_events_it_has_forgotten(demo, capfd):
    """Gradio summarised the kept events in a worker thread after each one; with the books emptied
    meanwhile it failed (KeyError 'function', "Task exception was never retrieved")."""
    for _ in range(20):
        run(demo, "echo", ["abc"])
    time.sleep(0.5)
    assert "Traceback" not in capfd.readouterr().err


def test_the_component_servers_debug_line_is_not_printed(capsys, caplog):
    import gradio.routes

    from web.gradio_queue import quiet_component_server

    quiet_component_server()
    with caplog.at_level(logging.INFO, logger="web.gradio_queue"):
        gradio.routes.print("content_type", "application/json")
        gradio.routes.print("Error cleaning up file x")
    assert capsys.readouterr().out == "" and [r.message for r in caplog.records] == ["gradio: Error cleaning up file x"]
