"""Engine speed: ms per 80 ms frame against concurrent sessions, time to first audio, and the
naive loop (one session after another, frame by frame) side by side.

    python -m benchmarks.step --device cpu --preset tiny --sessions 1,2,4,8
    python -m benchmarks.step --device cuda --preset 7b --sessions 1,8,32,64 --json
    python -m benchmarks.step --count-ops --sessions 1,8      # kernels per tick, counted on CPU

Weights are random (the 7B preset needs no download): speed does not depend on their values.
A tick is timed from the user's audio on the host to the agent's audio back on the host, as
the engine thread of the app does it. On CPU the naive loop is measured; on CUDA it is
N x the graphed single-session tick (the reference runs one session at a time the same way).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from personaplex.model.config import FRAME_SIZE, KV_FORMATS, PRESETS, WEIGHT_FORMATS, ModelConfig, SamplingParams
from personaplex.model.formats import quantize
from personaplex.model.lm import LMModel
from personaplex.model.loading import Models
from personaplex.model.mimi import Mimi
from personaplex.model.persona import VoicePrompt, build_prompt
from personaplex.runtime.capacity import slot_bytes, suggest_slots
from personaplex.runtime.engine import Engine

from .rows import Rows

VOICE_FRAMES = 50  # 4 s of voice prompt
ROLE_TOKENS = 60


def random_models(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Models:
    """Mimi and the LM with random weights of a sensible scale, built straight on the device."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        mimi, lm = Mimi(config.mimi), LMModel(config.lm).to(dtype)  # the LM in its dtype before any memory
    mimi, lm = mimi.to_empty(device=device), lm.to_empty(device=device)
    for module in (mimi, lm):
        for name, tensor in module.state_dict().items():
            if name.endswith(("alpha", "norm1.weight", "norm2.weight", "cluster_usage", "_initialized")):
                tensor.fill_(1.0)
            elif name.endswith(("bias", "scale")):
                tensor.fill_(0.01 if name.endswith("scale") else 0.0)
            else:
                tensor.normal_(0.0, 0.02 if "embedding_sum" not in name else 1.0)
    return Models(config, mimi.eval(), lm.eval(), None, {}, device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def persona(config: ModelConfig, seed: int):
    g = torch.Generator().manual_seed(seed)
    voice = VoicePrompt(codes=torch.randint(0, config.mimi.quantizer.bins, (8, VOICE_FRAMES), generator=g))
    role = torch.randint(4, config.lm.text_card, (ROLE_TOKENS,), generator=g).tolist()
    return build_prompt(voice, role, config.lm)


def time_ticks(engine: Engine, n: int, ticks: int, warmup: int) -> list[float]:
    bucket = engine.bucket_for(n)
    pcm = 0.1 * torch.randn(bucket, FRAME_SIZE)
    times = []
    for i in range(warmup + ticks):
        start = time.perf_counter()
        out = engine.step(pcm, bucket)
        out.pcm.cpu()  # the host copy the engine thread makes; it also waits for the device
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return times


def time_naive(engine: Engine, n: int, ticks: int) -> list[float]:
    pcm = 0.1 * torch.randn(1, FRAME_SIZE)
    times = []
    for i in range(ticks + 1):
        start = time.perf_counter()
        for slot in range(n):
            engine.step_slot(pcm, slot).pcm.cpu()
        if i:
            times.append((time.perf_counter() - start) * 1000)
    return times


def time_to_first_audio(engine: Engine, config: ModelConfig, prefill: bool, repeats: int) -> float:
    """Reset a slot, run a 4 s voice + 60-token role prompt, and produce the first audio frame."""
    results = []
    for r in range(repeats):
        prompt = persona(config, seed=100 + r)
        sync(engine.device)
        start = time.perf_counter()
        engine.start(0, prompt, SamplingParams(seed=r), prefill=prefill, keep_persona=engine.gen.pinning)
        engine.step(torch.zeros(1, FRAME_SIZE), 1).pcm.cpu()
        results.append((time.perf_counter() - start) * 1000)
    return statistics.median(results)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {"allocated_gib": round(torch.cuda.memory_allocated(device) / 2**30, 2),
            "reserved_gib": round(torch.cuda.memory_reserved(device) / 2**30, 2),
            "free_gib": round(free / 2**30, 2), "total_gib": round(total / 2**30, 2)}


def tick_row(engine: Engine, n: int, args: argparse.Namespace, naive: list[float] | None) -> dict:
    batched = time_ticks(engine, n, args.ticks, args.warmup)
    median = statistics.median(batched)
    row = {
        "sessions": n, "bucket": engine.bucket_for(n), "median_ms": round(median, 2),
        "p99_ms": round(percentile(batched, 0.99), 2), "max_ms": round(max(batched), 2), "ticks": len(batched),
        "rtf": round(median / 80, 3), "frames_per_s": round(n * 1000 / median, 1),
        "window_mean": attended(engine, engine.bucket_for(n)),
    }
    if naive is not None:
        row["naive_median_ms"] = round(statistics.median(naive), 2)
        row["speedup_vs_naive"] = round(statistics.median(naive) / median, 2)
    return row


def attended(engine: Engine, bucket: int) -> int:
    """Mean number of steps in the attention windows of slots 0..bucket-1 (at most the context):
    what a tick on the prefix route reads, which grows as the rows run."""
    return round(float(engine.gen.window_lengths()[:bucket].float().mean()))


def profile_tick(engine: Engine, n: int) -> dict:
    """One tick without its graph under the CUDA profiler: its kernels, their time, the top ones."""
    bucket = engine.bucket_for(n)
    pcm = 0.1 * torch.randn(bucket, FRAME_SIZE)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with engine.without_graphs():
        for _ in range(3):
            engine.step(pcm, bucket)
        sync(engine.device)
        with torch.profiler.profile(activities=activities) as prof:
            engine.step(pcm, bucket)
            sync(engine.device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, float] = {}
    for k in kernels:
        by_name[k.name] = by_name.get(k.name, 0.0) + k.device_time
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:15]
    return {"sessions": n, "bucket": bucket, "kernels": len(kernels), "gpu_time_ms": round(sum(by_name.values()) / 1000, 2),
            "top_kernels_us": {name[:120]: round(us, 1) for name, us in top}}


def run(args: argparse.Namespace, rows_out: Rows | None = None) -> dict:
    out = rows_out or Rows(None)
    device = torch.device(args.device)
    config = PRESETS[args.preset]
    dtype = torch.bfloat16 if device.type == "cuda" and args.preset == "7b" else torch.float32
    if args.dtype:
        dtype = getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    wanted = args.sessions.split(",")
    models = random_models(config, device, dtype)
    quantize(models.lm, args.weights)  # module by module: the full-width weights are freed as it goes
    after_weights = memory(device)
    kv = args.kv_cache
    most = suggest_slots(config, kv, dtype, device) if device.type == "cuda" else 8  # "max": as many as fit (at most 64)
    sessions = sorted({most if s == "max" else int(s) for s in wanted})
    skipped = []
    if device.type == "cuda":  # only the session counts the card holds (no OOM on an 80 GB card)
        fits = suggest_slots(config, kv, dtype, device, cap=max(sessions))
        skipped = [n for n in sessions if n > fits]
        sessions = [n for n in sessions if n <= fits] or [fits]
    started = time.perf_counter()
    keep = not args.no_pinning
    engine = Engine(models, num_slots=max(sessions), pinning=keep, compile=False if args.no_compile else None,
                    prefix_attention=False if args.masked_attention else None, one_graph=not args.graph_per_bucket, kv_cache=kv)
    engine_s = time.perf_counter() - started  # compiling and capturing every bucket
    out.emit("engine", preset=args.preset, device=str(device), dtype=str(dtype).removeprefix("torch."), weights=args.weights,
             kv_cache=kv, lm_weight_bytes=engine.weight_bytes(), kv_bytes_per_slot=engine.kv_bytes() // engine.num_slots,
             slots=max(sessions),
             start_s=round(engine_s, 1), compiled=engine.compiled, compile_failed=engine.compile_failed,
             one_graph_per_piece_failed=engine.every_batch_failed,
             cuda_graphs=engine.cuda_graphs, cuda_graphs_failed=engine.graphs_failed, prefix_attention=engine.prefix_attention,
             torch=torch.__version__, cuda=torch.version.cuda, skipped_sessions=skipped)
    for slot in range(max(sessions)):
        engine.start(slot, persona(config, seed=slot), SamplingParams(seed=slot), keep_persona=keep)
    after_engine = memory(device)
    rows, one_session = [], None
    for n in sessions:
        if device.type == "cuda":  # derived: the reference runs one session at a time, each as this one
            one_session = one_session or time_ticks(engine, 1, args.ticks, args.warmup)
            naive = [t * n for t in one_session]
        else:
            naive = time_naive(engine, n, max(3, args.ticks // 4))
        rows.append(tick_row(engine, n, args, naive))
        out.emit("tick", **rows[-1])
    ttfa = {
        "prefill_ms": round(time_to_first_audio(engine, config, True, args.repeats), 1),
        "stepped_ms": round(time_to_first_audio(engine, config, False, max(1, args.repeats // 2)), 1),
    }
    out.emit("time_to_first_audio", **ttfa)
    result = {
        "preset": args.preset, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "weights": args.weights, "kv_cache": kv, "lm_weight_bytes": engine.weight_bytes(),
        "kv_bytes_per_slot": engine.kv_bytes() // engine.num_slots, "cuda_graphs": engine.cuda_graphs, "cuda_graphs_failed": engine.graphs_failed,
        "compiled": engine.compiled, "compile_failed": engine.compile_failed, "engine_start_s": round(engine_s, 1),
        "prefix_attention": engine.prefix_attention,
        "prefix_attention_failed": engine.prefix_attention_failed,
        "personas_kept": keep,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "hardware": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "ticks": args.ticks, "rows": rows,
        "naive": "derived: n x the graphed 1-session tick" if device.type == "cuda" else "measured: one session after another",
        "time_to_first_audio": ttfa,
    }
    result["skipped_sessions"] = skipped
    with engine.full_windows():  # the worst case: every ring full, as after 4 minutes of talk
        result["full_rings"] = tick_row(engine, max(sessions), args, None)
        out.emit("full_rings", **result["full_rings"])
        if engine.cuda_graphs and args.eager_too:  # each count with its graph, then the same engine without
            eager = argparse.Namespace(**{**vars(args), "ticks": max(20, args.ticks // 5)})
            result["graphed_full_rows"], result["eager_rows"] = [], []
            for n in sessions:  # both on full rings: the same work, only the launches differ
                result["graphed_full_rows"].append(tick_row(engine, n, eager, None))
                out.emit("tick_with_graphs_full_rings", **result["graphed_full_rows"][-1])
                with engine.without_graphs():
                    result["eager_rows"].append(tick_row(engine, n, eager, None))
                out.emit("tick_without_graphs", **result["eager_rows"][-1])
        if args.profile and device.type == "cuda":
            result["profile"] = {}
            for n in sorted({1, max(sessions)}):
                result["profile"][str(n)] = profile_tick(engine, n)
                out.emit("profile", **result["profile"][str(n)])
    if device.type == "cuda":
        result["memory"] = {"after_weights": after_weights, "after_engine": after_engine,
                            "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
                            "slot_bytes_estimate": slot_bytes(config, kv, dtype),
                            "slot_bytes_measured": round((2**30 * (after_engine["allocated_gib"] - after_weights["allocated_gib"]))
                                                         / (max(sessions) + 1))}
        out.emit("memory", **result["memory"])
    return result


def render(result: dict) -> str:
    lines = [
        f"{result['preset']} on {result['device']} ({result['hardware']}), {result['dtype']}, {result['weights']} weights, "
        f"{result['kv_cache']} KV cache, "
        f"CUDA graphs: {result['cuda_graphs']}, compiled: {result['compiled']} (engine ready in {result['engine_start_s']} s), "
        f"attention over what each slot holds: {result['prefix_attention']}, "
        f"{result['ticks']} ticks per row; naive: {result['naive']}",
        "sessions  bucket  median ms  p99 ms  max ms    RTF  frames/s  naive ms  speed-up  window",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['sessions']:>8}  {r['bucket']:>6}  {r['median_ms']:>9}  {r['p99_ms']:>6}  {r['max_ms']:>6}  {r['rtf']:>5}  "
            f"{r['frames_per_s']:>8}  {r['naive_median_ms']:>8}  {r['speedup_vs_naive']:>7}x  {r['window_mean']:>6}"
        )
    f = result["full_rings"]
    lines.append(f"every ring full, {f['sessions']} sessions: median {f['median_ms']} ms, p99 {f['p99_ms']} ms, max {f['max_ms']} ms")
    if result.get("skipped_sessions"):
        lines.append(f"not measured (they do not fit this card): {result['skipped_sessions']} sessions")
    for n, prof in result.get("profile", {}).items():
        lines.append(f"profile, {n} sessions: {prof['kernels']} kernels, {prof['gpu_time_ms']} ms of GPU time")
    for g, r in zip(result.get("graphed_full_rows", []), result.get("eager_rows", []), strict=True):
        lines.append(f"every ring full, {r['sessions']} sessions: with CUDA graphs median {g['median_ms']} ms, p99 "
                     f"{g['p99_ms']} ms; without, median {r['median_ms']} ms, p99 {r['p99_ms']} ms")
    t = result["time_to_first_audio"]
    lines.append(f"time to first audio (4 s voice + {ROLE_TOKENS}-token role): prefill {t['prefill_ms']} ms, "
                 f"frame by frame {t['stepped_ms']} ms")
    if "memory" in result:
        m = result["memory"]
        lines.append(f"memory: {m['after_engine']}, peak {m['peak_allocated_gib']} GiB; per slot "
                     f"{m['slot_bytes_measured'] / 2**20:.0f} MiB measured, {m['slot_bytes_estimate'] / 2**20:.0f} MiB estimated")
    return "\n".join(lines)


def count_ops(args: argparse.Namespace) -> dict:
    """The kernels one tick would launch, on the narrow 7B (`benchmarks.ops`), at each session
    count: eager, then compiled as on a GPU (unless `--no-compile`; compiling the narrow 7B
    takes a minute or two per bucket on a CPU). Every slot keeps its persona, as in the app,
    unless `--no-pinning`. Compiled on a CPU, pinned slots attend through the masked path (the
    CPU's flex kernel has no log-sum-exp); on CUDA, and unpinned here, through `prefix_attention`."""
    from benchmarks.ops import count_tick, kernel_profile, narrow_7b

    torch.set_num_threads(args.threads)
    config = narrow_7b()
    sessions = [int(s) for s in args.sessions.split(",")]
    keep = not args.no_pinning
    models = random_models(config, torch.device("cpu"), torch.bfloat16)
    quantize(models.lm, args.weights)
    engine = Engine(models, num_slots=max(sessions), pinning=keep, compile=False, kv_cache=args.kv_cache)
    for slot in range(max(sessions)):
        engine.start(slot, persona(config, seed=slot), SamplingParams(seed=slot), keep_persona=keep)
    rows = []
    for path in ("eager", "compiled")[: 1 if args.no_compile else 2]:
        engine.compile_steps(path == "compiled")
        for n in sessions:
            with kernel_profile():
                counter = count_tick(engine, engine.bucket_for(n))
            rows.append({"path": path, "sessions": n, "bucket": engine.bucket_for(n), "ops": counter.total,
                         "host_syncs": counter.host_syncs, "by_part": dict(counter.regions.most_common()),
                         "top_ops": dict(counter.ops.most_common(12))})
    kept = "personas kept" if keep else "personas not kept"
    return {"preset": f"7b (narrow widths, bf16 LM, {args.weights} weights, {args.kv_cache} KV cache, {kept})",
            "torch": torch.__version__, "rows": rows}


def render_ops(result: dict) -> str:
    lines = [f"operations that launch a kernel, one tick, {result['preset']}"]
    for r in result["rows"]:
        parts = ", ".join(f"{k} {v}" for k, v in r["by_part"].items())
        lines.append(f"{r['path']:>8}, {r['sessions']:>3} sessions (bucket {r['bucket']}): {r['ops']} ops ({parts}); "
                     f"host syncs {r['host_syncs']}")
        lines.append("     most frequent: " + ", ".join(f"{k} {v}" for k, v in r["top_ops"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--sessions", default="1,2,4,8", help="comma-separated; max: as many as the card holds (8 on a CPU)")
    p.add_argument("--ticks", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5, help="time-to-first-audio repetitions")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--dtype", choices=["float32", "bfloat16"])
    p.add_argument("--weights", choices=WEIGHT_FORMATS, default="bf16", help="the LM's weights, quantized after they are made")
    p.add_argument("--kv-cache", choices=KV_FORMATS, default="bf16", help="the LM's KV cache")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--rows", help="append each figure to this file as a JSON line the moment it is measured")
    p.add_argument("--count-ops", action="store_true", help="count the kernels of one tick on the narrow 7B, on CPU")
    p.add_argument("--allow-eager", action="store_true", help="exit 0 even if the CUDA graphs could not be captured")
    p.add_argument("--eager-too", action="store_true", help="on CUDA, also time every count on full rings with its graph and without")
    p.add_argument("--profile", action="store_true", help="on CUDA, profile one tick (kernels and their time)")
    p.add_argument("--no-compile", action="store_true", help="the engine without torch.compile (the default on CUDA)")
    p.add_argument("--graph-per-bucket", action="store_true",
                   help="compiled, one graph per bucket (a bucket of 1 included) instead of one for them all")
    p.add_argument("--masked-attention", action="store_true",
                   help="compiled attention over every ring entry, masked, instead of what each slot holds")
    p.add_argument("--no-pinning", action="store_true", help="the plain ring, the personas not kept (as the reference)")
    args = p.parse_args(argv)
    with torch.inference_mode(), Rows(args.rows) as rows:
        if args.count_ops:
            result, text = count_ops(args), render_ops
        else:
            result, text = run(args, rows), render
    sys.stdout.write((json.dumps(result) if args.json else text(result)) + "\n")
    if result.get("cuda_graphs_failed") and not args.allow_eager:
        sys.stderr.write(f"CUDA graph capture failed ({result['cuda_graphs_failed']}): these are eager figures; "
                         "pass --allow-eager to accept them\n")
        sys.exit(3)


if __name__ == "__main__":
    main()
