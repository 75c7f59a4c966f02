"""Gradio 5.50's queue, made to forget what it has done and to answer every bad request in words.

Implements:
  * `forget_finished_events`: Gradio's queue keeps every event it ever ran, with its request and
    its values (`Queue.event_ids_to_events`, `Queue.event_analytics`, the finished task of each
    in `Queue._asyncio_tasks`, its id in `App.iterators_to_reset`: nothing removes them), and
    after every event it summarised all of them with pandas, in a worker thread, for a
    monitoring page this app does not use. Memory grew by what each request carried (20 MB per
    10 MB request) and never came back. Here, once an event is done, the events that are neither
    waiting nor running are dropped, and the summary is not made;
  * `quiet_component_server`: Gradio's component server prints the content type of every
    request (a debug line left in Gradio 5.50: ten lines a call, the browser's ICE candidates);
  * `explain_refusals`: an exception raised while Gradio itself reads a client's values (a file
    where a string belongs, too few arguments) reached the client as `error: null` and the log as
    a traceback. Here it becomes a `gr.Error` with a one-line reason, logged in one line. Our own
    functions turn their faults into messages themselves (and log those with their traceback).
Both replace methods of one object (the app's queue, the app's Blocks), not Gradio's classes.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import gradio as gr

logger = logging.getLogger(__name__)

REASON_CHARS = 200  # of a refusal's reason: the first line, cut here


def forget_finished_events(demo: gr.Blocks) -> None:
    """After each event, drop from the queue's books every event that is not waiting or running."""
    queue = demo._queue
    run = queue.process_events

    @functools.wraps(run)
    async def process_events(*args: Any, **kwargs: Any) -> None:
        try:
            await run(*args, **kwargs)
        finally:
            _forget(queue)

    queue.process_events = process_events
    # Gradio summarised every event kept so far with pandas after each one, in a worker thread:
    # with the books kept short that summary is of nothing, and it read them while they changed.
    queue.compute_analytics_summary = lambda analytics: queue.cached_event_analytics_summary


def _forget(queue: Any) -> None:
    """Runs on the server's event loop, as every change to these books does."""
    alive = {event._id for q in queue.event_queue_per_concurrency_id.values() for event in q.queue}
    alive |= {event._id for job in queue.active_jobs if job for event in job}
    for books in (queue.event_ids_to_events, queue.event_analytics):
        for event_id in [e for e in books if e not in alive]:
            del books[event_id]
    queue._asyncio_tasks[:] = [task for task in queue._asyncio_tasks if not task.done()]  # each held its event
    if queue.server_app is not None:  # ids of finished events, marked "reset" for good
        queue.server_app.iterators_to_reset.intersection_update(alive)


def explain_refusals(demo: gr.Blocks) -> None:
    """Any exception but a `gr.Error` out of Gradio's handling of an event becomes one, with a reason."""
    process = demo.process_api

    @functools.wraps(process)
    async def process_api(*args: Any, **kwargs: Any) -> Any:
        try:
            return await process(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:
            reason = short_reason(exc)
            logger.info("refused a request: %s", reason)
            raise gr.Error(f"the request was refused: {reason}", print_exception=False) from None

    demo.process_api = process_api


def short_reason(exc: BaseException) -> str:
    """An exception as one short line (pydantic's and Gradio's messages run over many)."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 1] + "…"


def quiet_component_server() -> None:
    """Gradio's routes print to stdout: the component server's debug line is dropped, anything else
    they print goes to the log (the module's own `print` only)."""
    import gradio.routes

    def to_log(*args: Any, **kwargs: Any) -> None:
        if args and args[0] != "content_type":
            logger.info("gradio: %s", " ".join(str(a) for a in args))

    gradio.routes.print = to_log  # type: ignore[attr-defined]
