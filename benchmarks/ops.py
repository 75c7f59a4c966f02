"""Operations of one engine tick: what a GPU would launch as kernels, counted on the CPU.

    python -m benchmarks.step --count-ops

The 7B preset is copied with its widths cut (its depth, heads, codebooks, vocabulary, context
and Mimi are the release's), so that one tick runs on a CPU in seconds with exactly the 7B's
sequence of operations. The tick runs under the profiler; an ATen operation is counted when it
does work itself: the innermost operations (a composite such as a cast or `rms_norm` counts as
what it is made of), except views and no-ops (a cast to the same dtype, a reshape of a contiguous
tensor) and allocations, which launch nothing on a GPU. Operations that CUDA runs as one kernel
(GEMMs, fused attention, the fused norms, convolutions) count once, whatever they call on a CPU.
In compiled regions (`Engine(compile=True)`, the default on CUDA) each kernel Inductor generated
counts once (on a CPU its C++ kernels, which `kernel_profile` makes visible to the profiler),
and so does each operation it calls outside them (GEMMs, top-k).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from personaplex.model.config import FRAME_SIZE, PERSONAPLEX_7B, ModelConfig

NO_KERNEL = {  # views, no-ops, allocations, metadata
    "view", "_unsafe_view", "_reshape_alias", "as_strided", "alias", "select", "slice", "narrow", "transpose", "t",
    "permute", "unsqueeze", "squeeze", "expand", "expand_as", "detach", "view_as_real", "view_as_complex", "unflatten",
    "flatten", "reshape", "to", "type_as", "contiguous", "split", "split_with_sizes", "unbind", "chunk", "lift_fresh",
    "empty", "empty_strided", "empty_like", "resolve_conj", "resolve_neg", "result_type", "size", "stride", "dim",
    "is_nonzero", "_has_compatible_shallow_copy_type", "_local_scalar_dense", "item",
}
ONE_KERNEL = {  # composites that CUDA runs as one kernel (a GEMM, fused attention, a fused norm)
    "linear", "matmul", "scaled_dot_product_attention", "layer_norm", "rms_norm", "group_norm", "conv1d",
    "conv_transpose1d", "convolution", "embedding",
}
REGIONS = [  # (file, function) -> the part of the tick; the innermost frame that matches wins
    (("sampling.py", "sample_tokens"), "sampling"), (("sampling.py", "race_noise"), "sampling"),
    (("sampling.py", "stream_keys"), "sampling"), (("generate.py", "_sample"), "sampling"),
    (("lm.py", "depformer_step"), "depformer"), (("generate.py", "_depformer"), "depformer"),
    (("lm.py", "forward_embeddings"), "temporal transformer"), (("lm.py", "embed"), "temporal transformer"),
    (("generate.py", "ring_prepare"), "token ring"), (("generate.py", "ring_commit"), "token ring"),
    (("mimi.py", "encode"), "mimi encode"), (("mimi.py", "decode"), "mimi decode"),
    (("generate.py", "heads"), "sampling + depformer (compiled)"),
]
GENERATED = re.compile(r"^graph_\d+_(cpp_|triton_|kernel)")  # a kernel Inductor generated (`kernel`: its CPU flex template)


def narrow_7b() -> ModelConfig:
    """The 7B structure with narrow widths: the same operations per tick, a CPU's work."""
    c = PERSONAPLEX_7B
    lm = dataclasses.replace(c.lm, dim=128, depformer_dim=64, depformer_dim_feedforward=int(4.125 * 64))
    return dataclasses.replace(c, lm=lm)


@dataclass
class OpCount:
    ops: Counter[str] = field(default_factory=Counter)  # by operation
    regions: Counter[str] = field(default_factory=Counter)  # by part of the tick
    host_syncs: int = 0  # reads of a device value on the host (`.item()`): none may be in a tick

    @property
    def total(self) -> int:
        return sum(self.ops.values())


@contextlib.contextmanager
def kernel_profile() -> Iterator[None]:
    """Inductor's C++ kernels named in the profiler: on while a region is compiled (set before
    its first call)."""
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
        yield


def count_tick(engine, bucket: int) -> OpCount:
    """The kernels of one `Engine.step` over `bucket` slots (after a warm-up step)."""
    pcm = 0.1 * torch.randn(bucket, FRAME_SIZE)
    engine.step(pcm, bucket)
    stacks = torch._C._profiler._ExperimentalConfig(verbose=True)  # the Python frames of every operation
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=True,
                                experimental_config=stacks) as prof:
        engine.step(pcm, bucket)
    return tally(prof.events())


def tally(events) -> OpCount:
    count = OpCount()
    for event in events:
        if GENERATED.match(event.name):
            count.ops["generated kernel"] += 1
            count.regions[_region(event)] += 1
            continue
        if not event.name.startswith("aten::"):
            continue
        name = event.name.removeprefix("aten::")
        if name in ("_local_scalar_dense", "item"):
            count.host_syncs += name == "_local_scalar_dense"
            continue
        if _inside_one_kernel(event) or name in NO_KERNEL:
            continue
        if name not in ONE_KERNEL and any(c.name.startswith("aten::") for c in event.cpu_children):
            continue  # a composite: its parts are counted
        count.ops[name.rstrip("_") + ("_" if name.endswith("_") else "")] += 1
        count.regions[_region(event)] += 1
    return count


def _inside_one_kernel(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.removeprefix("aten::") in ONE_KERNEL:
            return True
        parent = parent.cpu_parent
    return False


def _region(event) -> str:
    for frame in event.stack or []:  # innermost first
        for (file, function), region in REGIONS:
            if f"{file}(" in frame and frame.endswith(f": {function}"):
                return region
    return "other"
