"""One LM layer's attention over the ring at the 7B's heads (32 x 128, 3,000 entries), compiled
both ways: masked (every entry read, a boolean mask: the route of prompts and of the engine
uncompiled) and the prefix route (`prefix_attention`: flex attention over the entries each
slot has filled, the compiled tick's route), at ring fills from a young call to a full ring.

    python -m benchmarks.attention --device cpu --sessions 1,8
    python -m benchmarks.attention --device cuda --sessions 1,8,64 --pinned

Each row times the whole attention of one layer for every slot as the tick computes it, the
mask (or block mask) made from the slots' lengths included. Median over `--reps` calls after a
warm-up; on CUDA timed with events. Beside it, the kernel time by the profiler (`kernel_ms`):
small calls are mostly Python and launches, which the tick's CUDA graph does not pay. Random inputs: speed does not depend on their values. With
`--pinned` every slot keeps a 100-entry persona (two queries; on CUDA only: Inductor's CPU flex
kernel has no log-sum-exp, so compiled on a CPU pinned slots stay masked).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from personaplex.model.attention import pinned_attention, prefix_attention, prefix_mask
from personaplex.model.config import PERSONAPLEX_7B

from .rows import Rows

PERSONA = 100  # pinned entries with --pinned (a short voice prompt and role)


def masked(q, q_pinned, keys, values, lengths, pinned=None):
    """Every ring entry read, those beyond each slot's length masked (and the pinned ones scored
    with `q_pinned`): the route the prefix route replaces, also the tests' reference."""
    entries = torch.arange(keys.shape[2], device=keys.device)[None]
    mask = (entries < lengths[:, None])[:, None, None]  # [B, 1, 1, C]
    if pinned is None:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    return pinned_attention(q, q_pinned, keys, values, mask, (entries < pinned[:, None])[:, None, None])


def prefix(q, q_pinned, keys, values, lengths, pinned):
    return prefix_attention(q, q_pinned, keys, values, prefix_mask(lengths, keys.shape[2], pinned))


def time_calls(fn, args: tuple, device: torch.device, reps: int) -> float:
    """Median ms of `fn(*args)`."""
    for _ in range(5):
        fn(*args)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begun = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - begun) * 1000)
    return statistics.median(times)


def kernel_ms(fn, args: tuple, device: torch.device, reps: int) -> float:
    """Mean ms per call of what `fn` runs, by the profiler: on CUDA the time of its kernels on the
    device, on a CPU the time of its operations (compiled kernels included) on the CPU. A small
    attention's wall time is mostly Python and launches; this is what the tick's CUDA graph pays."""
    fn(*args)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(reps):
            fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if device.type == "cuda":
        total_us = sum(e.device_time for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    else:  # the operations' own time: aten ops, and the compiled graph's C++ kernels (inside its call's
        # record, not recorded one by one); not Dynamo's guards around the compiled region
        total_us = sum(e.self_cpu_time_total for e in prof.key_averages() if not e.key.startswith("Torch-Compiled Region"))
    return total_us / 1000 / reps


def run(args: argparse.Namespace, rows_out: Rows | None = None) -> dict:
    out = rows_out or Rows(None)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    lm = PERSONAPLEX_7B.lm
    H, D, C = lm.num_heads, lm.dim // lm.num_heads, lm.context
    routes = {"masked": torch.compile(masked, fullgraph=True, dynamic=False),
              "prefix": torch.compile(prefix, fullgraph=True, dynamic=False)}
    if args.pinned and device.type == "cpu":
        del routes["prefix"]
    setup = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "heads": H, "head_dim": D, "context": C,
             "pinned": args.pinned, "threads": torch.get_num_threads() if device.type == "cpu" else None,
             "hardware": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
             "torch": torch.__version__}
    out.emit("setup", **setup)
    rows = []
    for n in [int(s) for s in args.sessions.split(",")]:
        g = torch.Generator(device=device).manual_seed(n)
        q, q_pinned = (torch.randn(n, H, 1, D, generator=g, device=device, dtype=dtype) for _ in range(2))
        keys, values = (torch.randn(n, H, C, D, generator=g, device=device, dtype=dtype) for _ in range(2))
        for fill in [float(f) for f in args.fills.split(",")]:
            lengths = torch.full((n,), max(1, round(fill * C)), device=device)
            pinned = torch.minimum(torch.full_like(lengths, PERSONA), lengths) if args.pinned else None
            call = (q, q_pinned if args.pinned else None, keys, values, lengths, pinned)
            row = {"sessions": n, "filled": int(lengths[0])}
            for name, fn in routes.items():
                row[f"{name}_ms"] = round(time_calls(fn, call, device, args.reps), 4)
                row[f"{name}_kernel_ms"] = round(kernel_ms(fn, call, device, args.reps), 4)
            rows.append(row)
            out.emit("attention", **row)
    return {**setup, "rows": rows}


def render(result: dict) -> str:
    lines = [f"one layer's attention, {result['heads']} heads of {result['head_dim']} over {result['context']} entries, "
             f"{result['dtype']} on {result['device']}{' (pinned persona)' if result['pinned'] else ''}; ms per call",
             "sessions  filled  masked ms  prefix ms  prefix/masked  masked kernels ms  prefix kernels ms  kernels prefix/masked"]
    for r in result["rows"]:
        ratio = f"{r['prefix_ms'] / r['masked_ms']:.2f}" if "prefix_ms" in r else "-"
        kernels = f"{r['prefix_kernel_ms'] / r['masked_kernel_ms']:.2f}" if "prefix_kernel_ms" in r and r["masked_kernel_ms"] else "-"
        lines.append(f"{r['sessions']:>8}  {r['filled']:>6}  {r['masked_ms']:>9}  {r.get('prefix_ms', '-'):>9}  {ratio:>13}  "
                     f"{r['masked_kernel_ms']:>17}  {r.get('prefix_kernel_ms', '-'):>17}  {kernels:>21}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--sessions", default="1,8")
    p.add_argument("--fills", default="0.03,0.25,0.5,1", help="fractions of the ring each slot has filled")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--dtype", choices=["float32", "bfloat16"])
    p.add_argument("--pinned", action="store_true", help="every slot keeps a persona (two queries)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--rows", help="append each figure to this file as a JSON line the moment it is measured")
    args = p.parse_args(argv)
    with torch.inference_mode(), Rows(args.rows) as rows:
        result = run(args, rows)
    sys.stdout.write((json.dumps(result) if args.json else render(result)) + "\n")


if __name__ == "__main__":
    main()
