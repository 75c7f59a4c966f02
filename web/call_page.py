"""What the page shows of a live call, and the messages that carry it over the call's data channel.

Implements:
  * `live_html`, `details_html`, `turns`, `idle_html`: the call as html (who is speaking and the
    verdict; the figures; the conversation turn by turn), every piece of text escaped;
  * `CallPage`: for one call, the next update message: only what changed since the last one the
    page was sent (a turn is keyed by its speaker and start, so a long turn is resent as it grows
    and the rest not at all), the figures once a second, and the ending with its reason.
The messages travel on the call's own WebRTC data channel as `{"type": MESSAGE_TYPE, "data": ...}`
and `web/call_page.js` draws them: no Gradio event is held open for a call, and only the peer
that holds the connection sees them. The html is made here, on the server, so that the page
script only puts it in place.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personaplex.runtime.transcript import MODEL, Transcript, clock_text
from personaplex.serve.contract import BEHIND_TICK_MS, FRAME_S, Ending, Phase, Session
from web.health import CallView, Memory, Verdict, memory

MESSAGE_TYPE = "personaplex"  # fastrtc's page leaves messages of other types alone
SCRIPT = Path(__file__).with_name("call_page.js")
STYLE = Path(__file__).with_name("page.css")
CAPTION_TURNS = 20  # turns shown live (the transcript file has them all)
CAPTION_CHARS = 1500  # of a turn shown live: its end
DETAILS_EVERY_S = 1.0  # the call's figures change slowly: sent once a second
VERDICT_CLASS = {Verdict.REAL_TIME: "ok", Verdict.BEHIND: "behind", Verdict.DROPPING: "dropping"}
PHASE_TEXT = {Phase.WAITING: "connecting", Phase.STARTING: "loading the persona", Phase.LIVE: "live", Phase.ENDED: "ended"}


@dataclass(frozen=True)
class CallFigures:
    """What the page's figures need beside the session: the engine and the connection now."""

    tick_ms: float  # the engine's time for an 80 ms frame of every call
    connection: str  # the WebRTC connection's state
    context_s: float  # the model's window


def script() -> str:
    """The page's script (the Blocks' `js`): it draws these messages."""
    return SCRIPT.read_text()


def style() -> str:
    """The page's css (the Blocks' `css`)."""
    return STYLE.read_text()


def idle_html() -> str:
    return live_frame(_meters(None), "<div class='verdict waiting'>press “Start the call”</div>", "", "")


def live_html(view: CallView, session: Session, held: Memory) -> str:
    """Who is speaking (two meters), the verdict, and why the call ended or what to mind."""
    if session.phase is not Phase.LIVE or view.verdict is None:
        verdict = f"<div class='verdict waiting'>{PHASE_TEXT[session.phase]}</div>"
    else:
        verdict = f"<div class='verdict {VERDICT_CLASS[view.verdict]}'>{view.verdict.value}</div>"
    limit = session.limits.time_limit_s
    verdict += f"<span class='clock'>{clock_text(session.elapsed_s)}{f' of {clock_text(limit)}' if limit else ''}</span>"
    note = ""
    if session.ending is not None:
        note = f"<p class='warn'>⚠ {html.escape(session.ending.message, quote=False)}</p>"
    elif session.phase is Phase.LIVE and held.warning:
        note = f"<p class='warn'>⚠ {html.escape(held.warning, quote=False)}</p>"
    reason = session.ending.reason if session.ending is not None else ""
    return live_frame(_meters(view if session.ending is None else None), verdict, note, reason)  # ended: nobody speaks


def live_frame(meters: str, verdict: str, note: str, reason: str) -> str:
    return f"<div class='live' data-ending='{html.escape(reason)}'><div class='meters'>{meters}</div>{verdict}{note}</div>"


def _meters(view: CallView | None) -> str:
    rows = []
    for name, activity in (("You", view.user if view else None), ("Model", view.model if view else None)):
        speaking = activity is not None and activity.speaking
        width = 100 * activity.fraction if activity is not None else 0
        state = "—" if activity is None else "speaking" if speaking else "quiet"
        rows.append(f"<div class='who{' speaking' if speaking else ''}'><span class='name'>{name}</span>"
                    f"<span class='meter'><i style='width:{width:.0f}%'></i></span><span class='state'>{state}</span></div>")
    return "".join(rows)


def call_memory(session: Session, context_s: float) -> Memory:
    return memory(context_s, session.prompt_frames * FRAME_S, session.stats.frames_in * FRAME_S, session.keeps_persona)


def details_html(session: Session, figures: CallFigures, held: str = "") -> str:
    """The figures behind the verdict; `held`: what the model's memory holds (`call_memory`)."""
    s, limit, tick_ms = session.stats, session.limits.time_limit_s, figures.tick_ms
    heard = max(1, s.frames_in + s.too_fast)
    rows = [
        ("connection", f"{figures.connection}; the call is {PHASE_TEXT[session.phase]}"),
        ("engine tick", f"{tick_ms:.1f} ms for an 80 ms frame (real-time factor {tick_ms / 1000 / FRAME_S:.2f})"
                        + (" — near its limit" if tick_ms > BEHIND_TICK_MS else "")),
        ("your audio dropped", f"{s.too_fast + s.unheard} of {heard} frames ({100 * (s.too_fast + s.unheard) / heard:.1f} %)"),
        ("the model's audio dropped", f"{s.silent_out + s.dropped_out} frames answered with silence or not taken"),
        ("call time", clock_text(session.elapsed_s) + (f" of {clock_text(limit)}" if limit else "")),
    ]
    if held and session.phase is Phase.LIVE:
        rows.append(("the model's memory", held))
    cells = "".join(f"<tr><td>{k}</td><td>{html.escape(v, quote=False)}</td></tr>" for k, v in rows)
    return f"<table class='details'>{cells}</table>"


def turns(transcript: Transcript) -> list[tuple[str, str, str]]:
    """The turns as (key, "bot" or "user", html): the model's words, and when you spoke. The key
    (speaker and start) stays the same while a turn grows."""
    return [(f"{t.speaker[0]}{round(t.start_s * 1000)}", "bot" if t.speaker == MODEL else "user",
             html.escape(f"{clock_text(t.start_s)} · {_tail(t.render(), CAPTION_CHARS)}", quote=False))
            for t in transcript.turns()]


def _tail(text: str, chars: int) -> str:
    """The end of a long turn (a monologue), so that every update stays small."""
    return text if len(text) <= chars else "…" + text[-chars:].lstrip()


def encode(data: dict[str, Any]) -> str:
    return json.dumps({"type": MESSAGE_TYPE, "data": data}, separators=(",", ":"))


class CallPage:
    """The updates of one call's page; `sent` is called once a message has gone out."""

    def __init__(self) -> None:
        self._turns: dict[str, str] = {}  # key -> html, as the page has them (the latest ones)
        self._details_at = -float("inf")

    def update(self, view: CallView, session: Session, figures: CallFigures, now: float, final: bool = False) -> dict[str, Any]:
        """The next message: the live view always, the turns that changed, the figures when due."""
        held = call_memory(session, figures.context_s)
        data: dict[str, Any] = {"live": live_html(view, session, held)}
        current = turns(view.captions)
        changed = [list(t) for t in current if self._turns.get(t[0]) != t[2]]
        if changed:
            data["turns"] = changed
        if final or now - self._details_at >= DETAILS_EVERY_S:
            data["details"] = details_html(session, figures, held.held)
        if final and session.ending is not None:
            data["ending"] = _ending(session.ending)
        return data

    def sent(self, data: dict[str, Any], now: float) -> None:
        """`data` reached the channel: the page has these turns and figures now."""
        for key, _, text in data.get("turns", []):
            self._turns.pop(key, None)  # (re)inserted last: the oldest turns go first below
            self._turns[key] = text
        for key in list(self._turns)[: max(0, len(self._turns) - CAPTION_TURNS)]:
            del self._turns[key]  # scrolled out of the live window: never sent again
        if "details" in data:
            self._details_at = now


def _ending(ending: Ending) -> dict[str, str]:
    return {"reason": ending.reason, "message": ending.message}
