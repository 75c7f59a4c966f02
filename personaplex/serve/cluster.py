"""Cluster: engine replicas on Ray Serve, each call to a replica with a free slot.

Implements:
  * `EngineReplica`: the Serve deployment. One replica is one `Service` (one engine: a GPU, or a
    few CPU cores) behind a FastAPI ingress: `/api/chat` (the Moshi/PersonaPlex protocol,
    `serve.api_chat`), `/api/status` (readiness, voices, slots and calls, as JSON) and
    `/api/voices` (a custom voice clip, encoded here and kept in `VoiceStore` for the others).
  * `VoiceStore`: one small deployment that keeps uploaded voice clips where every replica can
    fetch them (a call with a custom voice may land on any replica).
  * `LeastLoaded`: the request router. Serve asks every replica how many calls it holds and
    sends a call to the one with the fewest; a replica accepts a few more connections than it
    has slots (`REFUSAL_ROOM`), so that when every slot of every replica is taken a call still
    reaches one at once and is refused there with the reason (kind 5), never queued unsaid.
  * `ClusterConfig`, `build_app`: the application; `serve run personaplex.serve.cluster:build_app
    checkpoint=DIR config=JSON` and `serve deploy` (deploy/serve.yaml) take the same arguments.
  * `main`: `python -m personaplex.cluster --checkpoint DIR --config JSON --device cpu --replicas 2
    --max-sessions 2 --port 8000` starts Ray on this machine and serves `ws://HOST:P/api/chat`
    through Serve's proxy until stopped.

Only this module imports Ray. A replica that dies ends its calls (their connections close; a
page in front says so), Serve's controller starts another, and the router sends new calls to
the live ones meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import logging
import random
import secrets
import signal
import sys
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from .api_chat import PATH, ChatDoor
from .contract import CUSTOM_VOICE_PREFIX, KV_FORMATS, MAX_UPLOAD_BYTES, REALTIME, WEIGHT_FORMATS, Limits
from .service import Service, Settings

logger = logging.getLogger(__name__)

PROBE_S = 0.5  # a replica that does not say within this how many calls it holds gets none
REFUSAL_ROOM = 4  # connections a replica takes beyond its slots: calls it refuses, with the reason
MAX_QUEUED = 16  # calls waiting for a replica at the proxy (while every one is refusing others): beyond, 503
STATUS_PATH = "/api/status"
VOICES_PATH = "/api/voices"
DEFAULT_VOICE = "NATF2"
BUSY = "every conversation slot of every engine is in use: try again in a minute"


@dataclass(frozen=True)
class ClusterConfig:
    """Everything a cluster is started with (one place: the CLI, `serve run` and serve.yaml)."""

    checkpoint: str | None = None  # a local folder with the release files (on every node)
    hf_repo: str | None = None  # else the hub (default nvidia/personaplex-7b-v1)
    config: str | None = None  # model hyper-parameters as JSON (default: the 7B release)
    device: str = "cuda"
    max_sessions: int | None = None  # slots per replica (default: what fits the GPU)
    replicas: int = 1  # fixed, unless min_replicas/max_replicas ask for autoscaling
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_calls: float | None = None  # autoscaling: calls per replica to aim for (default: 3/4 of its slots)
    cpus_per_replica: float = 2.0  # on a CPU: the cores one engine gets
    weights: str = "auto"  # the LM's weights: auto, bf16, int8, fp8
    kv_cache: str = "bf16"  # each conversation's KV cache: bf16, fp8
    time_limit_s: float | None = 600.0
    idle_timeout_s: float = REALTIME.idle_timeout_s

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ClusterConfig:
        """From `serve run`/serve.yaml arguments (strings or numbers); unknown names are refused."""
        known = {f.name: f for f in fields(cls)}
        unknown = set(args) - set(known)
        if unknown:
            raise ValueError(f"unknown cluster settings: {', '.join(sorted(unknown))}; known: {', '.join(known)}")
        values: dict[str, Any] = {}
        for name, value in args.items():
            kind = str(known[name].type)
            if value is None or value == "":
                values[name] = None
            elif "int" in kind:
                values[name] = int(value)
            elif "float" in kind:
                values[name] = float(value)
            else:
                values[name] = str(value)
        return cls(**values)

    @property
    def slots(self) -> int:
        return self.max_sessions or (4 if self.device == "cpu" else 32)


class LeastLoaded(FIFOMixin, RequestRouter):
    """Each call goes to the replica that holds the fewest calls now (Serve's default asks two
    replicas at random, and a replica counts a WebSocket call only some time after it came, so
    calls at the same moment could land on a full replica while another has room). A replica's
    count is the larger of what it says and what this router has sent it and not seen end; ties
    go to a random one of them."""

    def initialize_state(self, **kwargs: Any) -> None:
        self._held: dict[Any, int] = {}  # replica id -> calls this router sent there and has not seen end

    def on_request_routed(self, pending_request: PendingRequest, replica_id: Any, result: Any) -> None:
        self._held[replica_id] = self._held.get(replica_id, 0) + 1

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        self._held[replica_id] = max(0, self._held.get(replica_id, 0) - 1)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        said = await asyncio.gather(*(_calls_held(r) for r in candidate_replicas))
        counts = [None if n is None else max(n, self._held.get(r.replica_id, 0)) for n, r in zip(said, candidate_replicas)]
        ranked = sorted((n, random.random(), i) for i, n in enumerate(counts) if n is not None)
        return [[candidate_replicas[i]] for _, _, i in ranked]  # the least loaded first, then the next...


async def _calls_held(replica: RunningReplica) -> int | None:
    """What the replica holds now (None: it did not answer in time: a dead or stuck replica)."""
    try:
        return await replica.get_queue_len(deadline_s=PROBE_S)
    except Exception:  # any failure of the probe means the same: not this one
        return None


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1})
class VoiceStore:
    """Uploaded voice clips by key (HMAC of the clip and its page, with this cluster's secret)."""

    MAX_CLIPS = 256

    def __init__(self) -> None:
        self._secret = secrets.token_bytes(32)
        self._clips: dict[str, bytes] = {}

    def key(self, data: bytes, owner: str) -> str:
        mac = hmac.new(self._secret, owner.encode() + b"\0" + hashlib.sha256(data).digest(), hashlib.sha256)
        return CUSTOM_VOICE_PREFIX + mac.hexdigest()[:32]

    def put(self, key: str, data: bytes) -> None:
        self._clips[key] = data
        while len(self._clips) > self.MAX_CLIPS:
            del self._clips[next(iter(self._clips))]

    def get(self, key: str) -> bytes | None:
        return self._clips.get(key)


_replica: EngineReplica | None = None  # this process's replica (a Serve replica is a process of its own)


def _ingress() -> Starlette:
    """The replica's routes, built in the replica's process (Serve evaluates this builder there;
    a FastAPI app object cannot be pickled for it: it holds a lock)."""

    def replica() -> EngineReplica:
        found = sys.modules[__name__]._replica  # (see EngineReplica.__init__)
        assert found is not None, "the replica is not initialised"
        return found

    async def chat(websocket: WebSocket) -> None:
        await replica().chat(websocket)

    async def status(request: Request) -> JSONResponse:
        return await replica().status()

    async def add_voice(request: Request) -> JSONResponse:
        return await replica().add_voice(request)

    return Starlette(routes=[WebSocketRoute(PATH, chat), Route(STATUS_PATH, status),
                             Route(VOICES_PATH, add_voice, methods=["POST"])])


@serve.deployment
@serve.ingress(_ingress)
class EngineReplica:
    def __init__(self, config: dict[str, Any], voices: Any) -> None:
        self.config = ClusterConfig(**config)
        c = self.config
        self.service = Service(Settings(c.checkpoint, c.hf_repo, c.config, c.device, c.max_sessions, c.weights, c.kv_cache))
        self.service.start()
        status = self.service.wait_ready()  # Serve sends no call here before this returns
        if not status.ready:
            raise RuntimeError(f"the engine did not start: {status.message}")
        self.voices = voices
        limits = Limits(time_limit_s=c.time_limit_s, idle_timeout_s=c.idle_timeout_s)
        self.door = ChatDoor(self.service, limits, DEFAULT_VOICE, custom_voice=self._custom_voice, busy=BUSY)
        # Where the routes find it: the module itself (Serve may run this method from a copy of
        # the class, whose globals are not the module's).
        sys.modules[__name__]._replica = self

    async def check_health(self) -> None:
        """Serve's health check: a failed engine is replaced."""
        if not self.service.status.ready:
            raise RuntimeError(self.service.status.message)

    async def chat(self, websocket: WebSocket) -> None:
        await self.door.serve(websocket)

    async def status(self) -> JSONResponse:
        """This replica's engine (readiness, voices, slots, calls now), and how many replicas of
        the replicas by state (Serve's controller says: RUNNING, STARTING...)."""
        figures = self.service.figures()
        summary = self.service.summary()
        states = await asyncio.to_thread(_replica_states)
        return JSONResponse({
            "ready": self.service.status.ready, "level": summary.level, "summary": summary.text,
            "voices": self.service.voice_names(), "context_s": self.service.context_s,
            "weights": self.service.weights, "kv_cache": self.service.settings.kv_cache,
            "slots": figures.slots if figures else 0, "live": figures.live if figures else 0,
            "tick_ms": figures.tick_ms if figures else 0.0, "replicas": states.get("RUNNING", 0), "replica_states": states,
        })

    async def add_voice(self, request: Request) -> JSONResponse:
        """A custom voice clip (the request's body, any audio format): checked and encoded here,
        kept in the store for every replica; its key is the page's (`?owner=`) alone."""
        owner = request.query_params.get("owner", "")
        data = await request.body()
        if len(data) > MAX_UPLOAD_BYTES:
            return JSONResponse({"error": f"the file is larger than {MAX_UPLOAD_BYTES // 2**20} MB"}, status_code=413)
        key = await self.voices.key.remote(data, owner)
        try:
            voice = await asyncio.to_thread(self.service.add_custom_voice_bytes, data, key)
        except Exception as exc:  # said to the page as it is (a UserError) or in one line
            return JSONResponse({"error": str(exc)}, status_code=422)
        await self.voices.put.remote(key, data)
        return JSONResponse({"key": key, "seconds": voice.seconds})

    async def _custom_voice(self, key: str) -> None:
        """A call asks for a custom voice this replica has not encoded: fetch it from the store."""
        if self.service.voices.has(key):
            return
        data = await self.voices.get.remote(key)
        if data is not None:
            await asyncio.to_thread(self.service.add_custom_voice_bytes, data, key)


def _replica_states() -> dict[str, int]:
    """This deployment's replicas by state ({} if the controller cannot say now)."""
    context = serve.get_replica_context()
    try:
        deployment = serve.status().applications[context.app_name].deployments[context.deployment]
    except Exception:  # the controller is busy or restarting: the figures are not essential
        return {}
    return {str(getattr(state, "value", state)): n for state, n in deployment.replica_states.items()}


def build_app(args: dict[str, Any]) -> serve.Application:
    """The Serve application (`serve run personaplex.serve.cluster:build_app name=value ...`)."""
    config = ClusterConfig.from_args(dict(args))
    options: dict[str, Any] = {
        "max_ongoing_requests": config.slots + REFUSAL_ROOM,
        "max_queued_requests": MAX_QUEUED,
        "request_router_config": RequestRouterConfig(request_router_class=f"{__name__}.LeastLoaded"),
        "health_check_period_s": 5.0,
        "graceful_shutdown_timeout_s": 5.0,
    }
    if config.device == "cuda":
        options["ray_actor_options"] = {"num_gpus": 1}
    else:
        options["ray_actor_options"] = {"num_cpus": config.cpus_per_replica}
    if config.min_replicas is not None or config.max_replicas is not None:
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=config.min_replicas or 1, max_replicas=config.max_replicas or config.replicas,
            target_ongoing_requests=config.target_calls or max(1.0, 0.75 * config.slots),
        )
    else:
        options["num_replicas"] = config.replicas
    return EngineReplica.options(**options).bind(asdict(config), VoiceStore.bind())


def parse_args(argv: list[str] | None = None) -> tuple[ClusterConfig, str, int]:
    p = argparse.ArgumentParser(description="PersonaPlex engine replicas on Ray Serve (ws://HOST:PORT/api/chat)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="local folder with the release files (on every node)")
    source.add_argument("--hf-repo", help="hub repo (default nvidia/personaplex-7b-v1)")
    p.add_argument("--config", help="model hyper-parameters as JSON (default: the 7B release)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--replicas", type=int, default=1, help="engines (one per GPU)")
    p.add_argument("--min-replicas", type=int, help="autoscaling: at least this many")
    p.add_argument("--max-replicas", type=int, help="autoscaling: at most this many")
    p.add_argument("--target-calls", type=float, help="autoscaling: calls per replica to aim for")
    p.add_argument("--max-sessions", type=int, help="conversation slots per replica (default: what fits)")
    p.add_argument("--cpus-per-replica", type=float, default=2.0, help="on a CPU: cores per engine")
    p.add_argument("--weights", choices=("auto", *WEIGHT_FORMATS), default="auto", help="the LM's weights (8 bits: half)")
    p.add_argument("--kv-cache", choices=KV_FORMATS, default="bf16", help="each conversation's KV cache (fp8: half)")
    p.add_argument("--time-limit", type=float, default=600.0, help="seconds per call (0: none)")
    p.add_argument("--idle-timeout", type=float, default=REALTIME.idle_timeout_s)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    a = p.parse_args(argv)
    config = ClusterConfig(a.checkpoint, a.hf_repo, a.config, a.device, a.max_sessions, a.replicas, a.min_replicas,
                           a.max_replicas, a.target_calls, a.cpus_per_replica, a.weights, a.kv_cache, a.time_limit or None,
                           a.idle_timeout)
    return config, a.host, a.port


def main(argv: list[str] | None = None) -> None:
    import ray

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config, host, port = parse_args(argv)
    root = str(Path(__file__).resolve().parents[2])
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": root}}, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(asdict(config)), name="personaplex", route_prefix="/", blocking=False)
    logger.info("serving ws://%s:%s%s with %s replica(s) of %s slots", host, port, PATH, config.replicas, config.slots)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    # Run from the module under its own name: Serve records its classes (the deployments, the
    # router) by import path, and "__main__.LeastLoaded" is nowhere to be found elsewhere.
    from personaplex.serve.cluster import main as run

    run()
