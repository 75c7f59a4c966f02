"""Who may open and steer a WebRTC call (`web.connections`), with fastrtc's real component and
aiortc peers on loopback (no Gradio server): offers that never connect are closed within seconds
and make room for new ones, a malformed offer leaves nothing behind, a call's id is not a key to
it (another page cannot trickle to it or change its settings), and a refusal says why."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack
from fastrtc import AsyncStreamHandler, WebRTC

from web.connections import CallConnections


class Silence(AsyncStreamHandler):
    def __init__(self) -> None:
        super().__init__(expected_layout="mono", output_sample_rate=24000, input_sample_rate=48000)

    def copy(self) -> Silence:
        return Silence()

    async def receive(self, frame) -> None:
        pass

    async def emit(self):
        await asyncio.sleep(0.02)
        return 24000, np.zeros((1, 480), dtype=np.int16)


class Page:
    """What Gradio hands a component server function: the request, whose JSON body says the page."""

    def __init__(self, session_hash: str) -> None:
        self.session_hash = session_hash

    async def json(self) -> dict:
        return {"session_hash": self.session_hash, "fn_name": "offer"}


def doors(limit: int = 10, connect_s: float = 1.0, max_opening: int = 8) -> CallConnections:
    component = WebRTC(modality="audio", mode="send-receive", render=False)
    component.event_handler = Silence()
    component.concurrency_limit = limit
    connections = CallConnections(component, connect_s=connect_s, max_opening=max_opening)
    connections.install()
    return connections


async def client_offer() -> tuple[RTCPeerConnection, dict]:
    pc = RTCPeerConnection()
    pc.createDataChannel("text")
    pc.addTrack(AudioStreamTrack())
    await pc.setLocalDescription(await pc.createOffer())
    return pc, {"sdp": pc.localDescription.sdp, "type": "offer"}


async def offer(connections: CallConnections, call_id: str, page: str = "page-a", connect: bool = True):
    """An offer as the page sends it; with `connect`, the client completes the connection."""
    pc, body = await client_offer()
    answer = await connections.component.offer({**body, "webrtc_id": call_id}, Page(page))
    if connect and "sdp" in answer:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    else:
        await pc.close()  # gone without a word: the server's side waits for ICE that never comes
    return pc, answer


async def until(condition, timeout: float = 10.0) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "timed out"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def test_offers_that_never_connect_are_closed_and_free_their_places():
    async def scenario():
        connections = doors(limit=4, connect_s=1.0)
        for i in range(4):
            _, answer = await offer(connections, f"ghost{i}", connect=False)
            assert "sdp" in answer
        _, refused = await offer(connections, "late", connect=False)  # every place taken, for now
        waited = await until(lambda: not connections.component.pcs, timeout=5.0)
        pc, answer = await offer(connections, "real")
        await until(lambda: connections.state("real") == "connected")
        await asyncio.sleep(1.5)  # past connect_s: a connected call stays
        state = connections.state("real")
        await pc.close()
        return refused, waited, answer, state

    refused, waited, answer, state = asyncio.run(scenario())
    assert refused["status"] == "failed" and refused["meta"]["error"] == "concurrency_limit_reached"
    assert "all 4 connections are in use: try again in a minute" == refused["meta"]["message"]
    assert waited < 2.5 and "sdp" in answer and state == "connected"


def test_a_flood_of_offers_cannot_keep_a_caller_out():
    """More offers that never connect than may be opening at once: the oldest make room at once."""

    async def scenario():
        connections = doors(limit=12, connect_s=30.0, max_opening=4)
        for i in range(8):  # the probe's 8 ghost offers, faster than any timeout
            await offer(connections, f"ghost{i}", connect=False)
        opening = len(connections.component.pcs)
        started = time.monotonic()
        pc, answer = await offer(connections, "real")
        await until(lambda: connections.state("real") == "connected")
        admitted = time.monotonic() - started
        await pc.close()
        for call_id in list(connections.component.pcs):
            await connections.close(call_id)
        return opening, answer, admitted

    opening, answer, admitted = asyncio.run(scenario())
    assert opening <= 4 and "sdp" in answer and admitted < 5.0


def test_a_malformed_offer_leaves_nothing_behind():
    async def scenario():
        connections = doors(limit=2)
        answers = [await connections.component.offer(body, Page("page-a")) for body in (
            {"sdp": "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n", "type": "offer", "webrtc_id": "broken"},  # aiortc raises
            {"sdp": "x" * 100_000, "type": "offer", "webrtc_id": "huge"},
            {"type": "offer", "webrtc_id": "../../etc"},
            ["not", "a", "dict"],
            {"sdp": "v=0", "type": "offer", "webrtc_id": "x" * 65},
        )]
        no_page = await connections.component.offer({"sdp": "v=0", "type": "offer", "webrtc_id": "abc"}, object())
        return connections, [*answers, no_page]

    connections, answers = asyncio.run(scenario())
    assert all(a["status"] == "failed" and a["meta"]["message"] for a in answers), answers
    assert connections.component.pcs == {} and connections.component.handlers == {}  # fastrtc kept the first forever


def test_only_the_page_that_opened_a_call_may_trickle_to_it_or_set_its_values():
    async def scenario():
        connections = doors()
        pc, _ = await offer(connections, "call-a", page="page-a")
        await until(lambda: connections.state("call-a") == "connected")
        candidate = {"type": "ice-candidate", "webrtc_id": "call-a",
                     "candidate": {"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host", "sdpMid": "0"}}
        foreign = await connections.component.offer(candidate, Page("page-b"))
        handler = connections.component.connections["call-a"][0].event_handler
        connections.component.set_input_gradio(Page("page-b"), "call-a", "muted by someone else")
        by_other = list(handler.latest_args)
        connections.component.set_input_gradio(Page("page-a"), "call-a", "the page's own value")
        by_owner = list(handler.latest_args)
        again = await connections.component.offer({**(await client_offer())[1], "webrtc_id": "call-a"}, Page("page-b"))
        await pc.close()
        return foreign, by_other, by_owner, again

    foreign, by_other, by_owner, again = asyncio.run(scenario())
    assert foreign["meta"]["error"] == "unknown_connection"
    assert "muted by someone else" not in by_other and by_owner[-1] == "the page's own value"
    assert again["meta"]["error"] == "connection_already_exists"


def test_there_is_no_output_stream_to_quit():
    connections = doors()
    assert asyncio.run(connections.component.quit_output_stream({"webrtc_id": "anything"}, Page("p"))) == {"success": True}
    assert connections.component.additional_outputs == {}


@pytest.mark.parametrize("page", [None, "", "x" * 200])
def test_an_offer_without_a_page_is_refused(page):
    async def scenario():
        return await doors().component.offer({"sdp": "v=0", "type": "offer", "webrtc_id": "abc"}, Page(page))

    assert asyncio.run(scenario())["meta"]["error"] == "bad_request"
