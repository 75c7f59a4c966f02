#!/usr/bin/env bash
# The GPU suite in one command, for whoever has a CUDA GPU (10 to 15 minutes on an H100/H200,
# compiling included): the device and versions, the GPU tests, the engine benchmark
# on the 7B preset in bf16 (random weights, compiled) at 1 to 64 sessions (as many as the card
# holds) with CUDA graphs and without, every ring full, memory, a profile of one tick; the same
# uncompiled at 1, 8 and 64 sessions; one layer's attention over what each slot holds against
# masked; and the kernel count. Writes benchmarks/out/gpu-*.json
# (the benchmarks) and gpu-*.log (everything). Run it from a clone after ./run_tests.sh (or
# with PYTHON pointing at an interpreter that has requirements-dev.txt).
#
# benchmarks/gpu.sh --quick: the first figures within one 10-minute command, for a short lease:
# the CUDA-graph and prefix-attention GPU tests, the 7B at 1, 8 and 64 sessions uncompiled
# (graphs on and off, every ring full, memory) and one layer's attention both ways, each step
# under its own time limit (8 minutes in all). Compiled figures then come from a second command:
#   python -m benchmarks.step --device cuda --preset 7b --sessions 1,8 --ticks 300
# benchmarks/gpu.sh --first: the first GPU time in one 10-minute call with half a minute to spare
# (cold Inductor cache): the device and versions, the GPU tests, the 7B in bf16 uncompiled at 1,
# 2, 8 and as many sessions as fit (young rings; then every ring full, each count with its graph and
# without; memory per slot against the estimate), the 7B compiled with 8 slots at 1 and 8
# sessions with its compile time and route, one layer's attention, and the 7B with int8 weights
# and the fp8 cache, uncompiled, at 1, 8 and as many sessions as fit (their memory per slot);
# each step time-stamped and under its own limit, every figure written as it is measured.
# benchmarks/gpu.sh --formats: the 8-bit formats in a second 10-minute call: int8 and fp8
# weights with the fp8 cache at 1, 8 and as many sessions as fit (graphs on and off, memory), then
# compiled with 8 slots.
# GPU_OUT names the folder for the JSON and the log (default benchmarks/out). On a machine with
# no package index, see benchmarks/device_wheels.sh.
set -euo pipefail
case "${1:-}" in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;  # the comments above: usage, nothing run
    ""|--quick|--first|--formats) ;;
    *) echo "unknown option: $1 (see benchmarks/gpu.sh --help)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
out=${GPU_OUT:-benchmarks/out}
mkdir -p "$out"
stamp=$(date -u +%Y%m%d-%H%M%S)
log="$out/gpu-$stamp.log"
json="$out/gpu-$stamp.json"
status=0
exec > >(tee "$log") 2>&1  # everything below goes to the screen and to the log
echo "== device"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" || true
bench() { "$PY" -c "import json, sys; from benchmarks.$1 import render; print(render(json.load(open(sys.argv[1]))))" "$2" || true; }
if [ "${1:-}" = --first ]; then
    at() { echo "== $(date -u +%H:%M:%S) $*"; }  # every step time-stamped: what a cut-short call still tells
    at "GPU tests: graphs replay eager, the prefix route in a graph"
    timeout 100 "$PY" -m pytest -q tests/test_gpu.py -k "prefix_route or not compiled" || status=1
    at "7B, bf16, uncompiled: 1, 2, 8 and as many sessions as fit; on full rings graphs on, then off; memory per slot"
    timeout 190 "$PY" -m benchmarks.step --device cuda --preset 7b --sessions 1,2,8,max --ticks 150 --no-compile --eager-too \
        --rows "${json%.json}-first-rows.jsonl" --json > "${json%.json}-first.json" || status=$?
    bench step "${json%.json}-first.json"
    at "7B, bf16, compiled, 8 slots (one graph per piece for buckets 2, 4 and 8), 1 and 8 sessions: compile time (the engine row), route"
    timeout 170 "$PY" -m benchmarks.step --device cuda --preset 7b --sessions 1,8 --ticks 200 \
        --rows "${json%.json}-compiled-rows.jsonl" --json > "${json%.json}-compiled.json" || status=$?
    bench step "${json%.json}-compiled.json"
    at "one layer's attention, 7B heads, plain"
    timeout 30 "$PY" -m benchmarks.attention --device cuda --sessions 1,64 --reps 100 \
        --rows "${json%.json}-attention-rows.jsonl" --json > "${json%.json}-attention.json" || status=$?
    bench attention "${json%.json}-attention.json"
    at "7B, int8 weights, fp8 KV cache, uncompiled: 1, 8 and as many sessions as fit; memory per slot"
    timeout 80 "$PY" -m benchmarks.step --device cuda --preset 7b --sessions 1,8,max --ticks 60 --repeats 1 --no-compile \
        --weights int8 --kv-cache fp8 --rows "${json%.json}-int8-rows.jsonl" --json > "${json%.json}-int8.json" || status=$?
    bench step "${json%.json}-int8.json"
    at "done: $out/gpu-$stamp* (exit $status); the 8-bit formats in full: benchmarks/gpu.sh --formats"
    exit "$status"
fi
if [ "${1:-}" = --formats ]; then
    at() { echo "== $(date -u +%H:%M:%S) $*"; }
    for weights in int8 fp8; do
        at "7B, $weights weights, fp8 KV cache, uncompiled: 1, 8 and as many sessions as fit; on full rings graphs on, then off; memory"
        timeout 150 "$PY" -m benchmarks.step --device cuda --preset 7b --sessions 1,8,max --ticks 100 --repeats 1 --no-compile \
            --eager-too --weights "$weights" --kv-cache fp8 --rows "${json%.json}-$weights-rows.jsonl" --json \
            > "${json%.json}-$weights.json" || status=$?
        bench step "${json%.json}-$weights.json"
    done
    at "7B, int8 weights, fp8 KV cache, compiled, 8 slots, 1 and 8 sessions"
    timeout 200 "$PY" -m benchmarks.step --device cuda --preset 7b --sessions 1,8 --ticks 200 --weights int8 --kv-cache fp8 \
        --rows "${json%.json}-int8-compiled-rows.jsonl" --json > "${json%.json}-int8-compiled.json" || status=$?
    bench step "${json%.json}-int8-compiled.json"
    at "done: $out/gpu-$stamp* (exit $status)"
    exit "$status"
fi
if [ "${1:-}" = --quick ]; then
    echo "== GPU tests: graphs replay eager, the prefix route in a graph"
    timeout 150 "$PY" -m pytest -q tests/test_gpu.py -k "prefix_route or not compiled" || status=1
    echo "== benchmark: 7B, bf16, uncompiled, CUDA graphs then without; every ring full; memory"
    timeout 240 "$PY" -m benchmarks.step --device cuda --preset 7b --sessions 1,8,64 --ticks 200 --no-compile --eager-too \
        --rows "${json%.json}-no-compile-rows.jsonl" --json > "${json%.json}-no-compile.json" || status=$?  # rows kept if cut short
    bench step "${json%.json}-no-compile.json"
    echo "== one layer's attention, 7B heads, plain and pinned"
    timeout 50 "$PY" -m benchmarks.attention --device cuda --sessions 1,64 --reps 100 --rows "${json%.json}-attention-rows.jsonl" --json > "${json%.json}-attention-plain.json" || status=$?
    bench attention "${json%.json}-attention-plain.json"
    timeout 50 "$PY" -m benchmarks.attention --device cuda --sessions 1,64 --reps 100 --pinned --rows "${json%.json}-attention-rows.jsonl" --json > "${json%.json}-attention-pinned.json" || status=$?
    bench attention "${json%.json}-attention-pinned.json"
    echo "wrote $out/gpu-$stamp* (exit $status)"
    exit "$status"
fi
echo "== GPU tests"; "$PY" -m pytest -q tests/test_gpu.py || status=1
echo "== benchmark: 7B, bf16, CUDA graphs, then without; every ring full; memory; profile"
"$PY" -m benchmarks.step --device cuda --preset 7b --sessions 1,8,16,32,64 --ticks 1000 --eager-too --profile \
    --rows "${json%.json}-rows.jsonl" --json > "$json" \
    || status=$?
bench step "$json"
echo "== benchmark: the same without torch.compile (graphs on), for its gain"
"$PY" -m benchmarks.step --device cuda --preset 7b --sessions 1,8,64 --ticks 300 --no-compile --json > "${json%.json}-no-compile.json" \
    || status=$?
bench step "${json%.json}-no-compile.json"
echo "== one layer's attention, 7B heads: over what each slot holds (flex) against masked, plain and pinned"
for kind in plain pinned; do
    f="${json%.json}-attention-$kind.json"
    "$PY" -m benchmarks.attention --device cuda --sessions 1,8,64 --reps 200 $([ $kind = pinned ] && echo --pinned) --rows "${f%.json}-rows.jsonl" --json > "$f" \
        || status=$?
    bench attention "$f"
done
echo "== kernels per tick (counted on the CPU)"; "$PY" -m benchmarks.step --count-ops --sessions 1,8 || status=1
echo "wrote $json and $log (exit $status)"
exit "$status"
